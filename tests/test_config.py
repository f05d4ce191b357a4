import re
from pathlib import Path

import pytest
import yaml

from utils.config import DEFAULTS, load_config, parse_args, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VQ_FILES = ["face", "hands", "upper", "lower_foot", "lower"]

# every key of the published configs/mambatalk.yaml (spec §1.6.1)
MAMBATALK_KEYS = """is_train ddp stat root_path out_path project data_path e_path eval_model e_name test_ckpt data_path_1
vae_test_len vae_test_dim vae_test_stride vae_length vae_codebook_size vae_layer vae_grow variational training_speakers
additional_data cache_path dataset new_cache ori_joints tar_joints pose_rep pose_norm pose_fps rot6d pre_frames
pose_dims pose_length stride test_length motion_f m_pre_encoder m_encoder m_fix_pre audio_rep audio_sr audio_fps
audio_norm audio_f word_rep word_index_num word_dims freeze_wordembed word_f t_pre_encoder t_encoder t_fix_pre
facial_rep facial_dims facial_norm facial_f f_pre_encoder f_encoder f_fix_pre id_rep speaker_f batch_size lr_base
model g_name trainer hidden_size n_layer rec_weight grad_norm epochs test_period test_start_epoch ll lf lu lh
cl cf cu ch""".split()


def write_yaml(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_mambatalk_yaml_keys_and_values():
    raw = yaml.safe_load((CONFIGS / "mambatalk.yaml").read_text())
    assert sorted(raw) == sorted(MAMBATALK_KEYS)
    a = load_config(CONFIGS / "mambatalk.yaml")
    assert a.lr_base == 5e-4 and isinstance(a.lr_base, float)  # "5e-4" is a string to YAML 1.1
    assert a.batch_size * a.lr_base / 128 == pytest.approx(2.5e-4)
    assert a.hidden_size == 768 and a.audio_f == 512 and a.motion_f == 256 and a.pose_dims == 330
    assert a.vae_grow == [1, 1, 2, 1] and a.training_speakers == [2]
    assert (a.ll, a.lf, a.lu, a.lh, a.cl, a.cf, a.cu, a.ch) == (3, 3, 3, 3, 1, 0, 1, 1)
    assert isinstance(a.cf, float) and a.grad_norm == 0.99
    assert a.e_name == "VAESKConv" and a.audio_rep == "amplitude+ctc+audio" and a.word_rep == "textgrid"
    assert a.m_pre_encoder is None and a.t_fix_pre is False and a.is_train is True
    assert (a.epochs, a.test_period, a.test_start_epoch) == (200, 10, 70)
    # values from the file survive unchanged (up to int -> float for float keys)
    for key, value in raw.items():
        if isinstance(DEFAULTS[key], float):
            assert getattr(a, key) == float(value), key
        else:
            assert getattr(a, key) == value, key
    # relevant published defaults not set in the yaml
    assert a.opt == "adam" and a.opt_betas == [0.5, 0.999] and a.decay_epochs == 9999 and a.random_seed == 2021


@pytest.mark.parametrize("part", VQ_FILES)
def test_vq_yamls_load_unchanged(part):
    expected = {  # spec §1.6.2 per-file table
        "face": ("beat_sep", "beat_smplx_face", 106, 2, "VQVAEConvZero", "aeface", 780, 800),
        "hands": ("beat_sep", "beat_smplx_hands", 180, 2, "VQVAEConvZero", "ae", 780, 800),
        "upper": ("beat_sep", "beat_smplx_upper", 78, 2, "VQVAEConvZero", "ae", 9999, 500),
        "lower_foot": ("beat_sep_lower", "beat_smplx_lower", 61, 4, "VQVAEConvZero", "aelowerfoot", 780, 800),
        "lower": ("beat_sep_lower", "beat_smplx_lower", 61, 4, "VAEConvZero", "aelower", 780, 800),
    }[part]
    path = CONFIGS / f"cnn_vqvae_{part}_30.yaml"
    raw = yaml.safe_load(path.read_text())
    a = load_config(path)
    got = (a.dataset, a.tar_joints, a.pose_dims, a.vae_layer, a.g_name, a.trainer, a.decay_epochs, a.epochs)
    assert got == expected
    assert a.vae_test_dim == a.pose_dims and a.vae_length == 256 and a.vae_test_len == 64
    assert a.lr_base == 3e-4 and a.test_period == 100 and a.project == "mage_smplx"
    assert a.rec_weight == a.rec_pos_weight == a.rec_ver_weight == 1.0
    assert a.e_name is None and a.audio_rep is None and a.word_rep is None and a.id_rep == "onehot"
    assert (a.facial_rep == "smplxflame_30") == (part == "face")
    assert "e_name" not in raw and "audio_rep" not in raw and "word_rep" not in raw
    assert a.test_start_epoch == 80 and a.grad_norm == 0.0  # published defaults


def test_cli_precedence_over_yaml_over_defaults(tmp_path):
    path = write_yaml(tmp_path, "batch_size: 32\nepochs: 7\n")
    a = parse_args(["-c", str(path), "--batch_size", "8"])
    assert a.batch_size == 8            # command line
    assert a.epochs == 7                # yaml
    assert a.pose_length == DEFAULTS["pose_length"]  # default
    assert a.config_path == str(path)
    b = parse_args(["--config", str(path)])
    assert b.batch_size == 32


def test_default_config_is_mambatalk(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    a = parse_args([])
    assert a.config_path == "configs/mambatalk.yaml" and a.hidden_size == 768


def test_lists_and_booleans(tmp_path):
    path = write_yaml(tmp_path, "training_speakers: [2]\nddp: False\n")
    a = parse_args(["-c", str(path), "--training_speakers", "2", "4", "30", "--opt_betas", "0.9", "0.99",
                    "--ddp", "yes", "--new_cache", "1", "--compile", "false", "--vq_fixes", "No"])
    assert a.training_speakers == [2, 4, 30]
    assert a.opt_betas == [0.9, 0.99]
    assert a.ddp is True and a.new_cache is True and a.compile is False and a.vq_fixes is False
    assert parse_args(["-c", str(path), "--gpus"]).gpus == []
    assert load_config(path, {"training_speakers": 3}).training_speakers == [3]


def test_auto_or_boolean_keys(tmp_path):
    """cuda_graph takes true/false as a boolean key does, or auto; anything else names the key and file."""
    path = write_yaml(tmp_path, "cuda_graph: true\n")
    assert load_config(path).cuda_graph is True
    assert parse_args(["-c", str(path), "--cuda_graph", "AUTO"]).cuda_graph == "auto"
    assert parse_args(["-c", str(path), "--cuda_graph", "no"]).cuda_graph is False
    assert load_config(write_yaml(tmp_path, "batch_size: 4\n")).cuda_graph == "auto"
    with pytest.raises(ValueError, match=r"bad.yaml.*cuda_graph.*true, false or auto"):
        load_config(write_yaml(tmp_path, "cuda_graph: sometimes\n", "bad.yaml"))


def test_none_default_keys(tmp_path):
    path = write_yaml(tmp_path, "e_name: VAESKConv\n")
    assert parse_args(["-c", str(path)]).e_name == "VAESKConv"
    assert parse_args(["-c", str(path), "--e_name", "none"]).e_name is None
    assert parse_args(["-c", str(path), "--audio_rep", "onset+amplitude"]).audio_rep == "onset+amplitude"


def test_unknown_key_is_an_error(tmp_path, capsys):
    path = write_yaml(tmp_path, "batch_size: 4\n")
    with pytest.raises(SystemExit):
        parse_args(["-c", str(path), "--batch_sizee", "3"])
    assert "--batch_sizee" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["-c", str(path), "--batch", "3"])  # no prefix matching
    bad = write_yaml(tmp_path, "batch_size: 4\nlearning_rate: 3\n", "bad.yaml")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(bad)
    with pytest.raises(ValueError, match="bogus"):
        load_config(path, {"bogus": 1})


def test_wrong_type_is_an_error(tmp_path, capsys):
    path = write_yaml(tmp_path, "batch_size: 4\n")
    with pytest.raises(SystemExit):
        parse_args(["-c", str(path), "--epochs", "ten"])
    assert "epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["-c", str(path), "--ddp", "maybe"])
    assert "ddp" in capsys.readouterr().err
    for text, key in [("epochs: 1.5\n", "epochs"), ("training_speakers: [a]\n", "training_speakers"),
                      ("ddp: sometimes\n", "ddp"), ("lr_base: fast\n", "lr_base"), ("out_path: [a, b]\n", "out_path"),
                      ("batch_size: null\n", "batch_size")]:
        bad = write_yaml(tmp_path, text, "bad.yaml")
        with pytest.raises(ValueError, match=key) as e:
            load_config(bad)
        assert "bad.yaml" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="mapping"):
        load_config(write_yaml(tmp_path, "- a\n- b\n", "list.yaml"))


def test_save_and_reload_round_trip(tmp_path):
    a = parse_args(["-c", str(CONFIGS / "mambatalk.yaml"), "--training_speakers", "2", "3", "--notes", "_x",
                    "--e_name", "none"])
    out = tmp_path / "run" / f"{a.name}.yaml"
    save_config(a, out)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left
    b = load_config(out)
    for key in DEFAULTS:
        assert getattr(b, key) == getattr(a, key), key
    assert yaml.safe_load(out.read_text())["name"] == a.name


def test_derived_name(tmp_path):
    path = write_yaml(tmp_path, "is_train: True\n", "my_exp.yaml")
    assert re.fullmatch(r"\d{4}_\d{6}_my_exp", load_config(path).name)
    assert load_config(path, {"is_train": False}).name == "my_exp"


def test_yaml_python_tags_never_run(tmp_path):
    """A config is read with safe_load: a python/object tag is an error naming the file, and nothing runs."""
    marker = tmp_path / "pwned"
    path = write_yaml(tmp_path, f"lr_base: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ValueError, match=rf"{path}: invalid YAML: could not determine a constructor"):
        load_config(path)
    assert not marker.exists()
