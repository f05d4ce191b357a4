"""Configuration: defaults < YAML file < command line.

Usage:
    args = parse_args()                      # python train.py -c configs/x.yaml --batch_size 32
    args = load_config("configs/x.yaml", {"batch_size": 32})

Every key has an entry in DEFAULTS; its type is the type of the default (or of the YAML value when the
default is None). The published YAML files load unchanged (spec §1.6).
"""
import argparse
import os
import time
from pathlib import Path

import yaml

from utils.checkpoint import atomic_write

DEFAULT_CONFIG = "configs/mambatalk.yaml"
DERIVED_KEYS = ("name", "config_path")  # computed, never read from a file or the command line

DEFAULTS = {
    # ---- run, paths, logging
    "is_train": True,
    "ddp": False,
    "stat": "ts",
    "project": "s2g",
    "notes": "",
    "csv_name": "a2g_0",
    "debug": False,
    "root_path": "./",
    "out_path": "./outputs/audio2pose/",
    "data_path": "./BEAT2/beat_english_v2.0.0/",
    "data_path_1": "./pretrained/",
    "cache_path": "datasets/beat_cache/beat_smplx_en_mambatalk_2/",
    "test_ckpt": "./pretrained/mambatalk_100.bin",
    "resume": "",
    "log_period": 10,
    "port": 8690,
    "random_seed": 2021,
    "gpus": [0],
    "loader_workers": 0,
    # ---- evaluation autoencoder (FGD) and VQ-VAE shapes
    "eval_model": "motion_representation",
    "e_name": None,
    "e_path": "weights/AESKConv_240_100.bin",
    "vae_test_len": 32,
    "vae_test_dim": 330,
    "vae_test_stride": 20,
    "vae_length": 240,
    "vae_codebook_size": 256,
    "vae_layer": 4,
    "vae_grow": [1, 1, 2, 1],
    "vae_quantizer_lambda": 1.0,
    "variational": False,
    # ---- data
    "dataset": "beat_sep_lower",
    "training_speakers": [2],
    "additional_data": False,
    "new_cache": False,
    "beat_align": True,
    "disable_filtering": False,
    "clean_first_seconds": 0,
    "clean_final_seconds": 0,
    "multi_length_training": [1.0],
    "word_cache": False,
    "ori_joints": "beat_smplx_joints",
    "tar_joints": "beat_smplx_full",
    "pose_rep": "smplxflame_30",
    "pose_norm": False,
    "pose_fps": 30,
    "rot6d": True,
    "pre_frames": 4,
    "pose_dims": 330,
    "pose_length": 64,
    "stride": 20,
    "test_length": 64,
    "audio_rep": None,
    "audio_sr": 16000,
    "audio_fps": 16000,
    "audio_norm": False,
    "word_rep": None,
    "word_index_num": 11195,
    "word_dims": 300,
    "freeze_wordembed": False,
    "facial_rep": None,
    "facial_dims": 100,
    "facial_norm": False,
    "id_rep": "onehot",
    "emo_rep": None,
    "sem_rep": None,
    # ---- encoders (mostly unused by MambaTalk, kept so the published YAML loads)
    "motion_f": 256,
    "m_pre_encoder": None,
    "m_encoder": None,
    "m_fix_pre": False,
    "audio_f": 512,
    "word_f": 256,
    "t_pre_encoder": None,
    "t_encoder": None,
    "t_fix_pre": False,
    "facial_f": 0,
    "f_pre_encoder": None,
    "f_encoder": None,
    "f_fix_pre": False,
    "speaker_f": 0,
    # ---- model
    "model": "mambatalk",
    "g_name": "MambaTalk",
    "trainer": "mambatalk",
    "hidden_size": 768,
    "n_layer": 1,
    # ---- optimisation
    "batch_size": 64,
    "lr_base": 5e-4,
    "opt": "adam",
    "opt_betas": [0.5, 0.999],
    "weight_decay": 0.0,
    "lr_policy": "step",
    "decay_epochs": 9999,
    "decay_rate": 0.1,
    "warmup_epochs": 0,
    "warmup_lr": 5e-4,
    "grad_norm": 0.0,
    "epochs": 200,
    "no_adv_epoch": 999,
    "test_period": 10,
    "test_start_epoch": 80,
    # ---- loss weights
    "rec_weight": 1.0,
    "rec_pos_weight": 0.0,
    "rec_ver_weight": 0.0,
    "ll": 0.0, "lf": 0.0, "lu": 0.0, "lh": 0.0,
    "cl": 0.0, "cf": 0.0, "cu": 0.0, "ch": 0.0,
    # ---- rendering
    "render_video_fps": 30,
    "render_video_width": 1920,
    "render_video_height": 720,
    # ---- project keys (not in the published code)
    "ssm_backend": "auto",        # auto | cuda | torch | reference
    "device": "auto",             # auto | cpu | cuda | cuda:N
    "amp": "none",                # none | bf16
    "compile": False,
    "cuda_graph": "auto",         # auto | true | false: the MambaTalk step as one CUDA graph (auto: on one GPU)
    "fused_adam": False,
    "max_steps": 0,               # 0 = no cap (tests and demo set a cap)
    "ctc_model": "facebook/wav2vec2-base-960h",  # HF name or local dir; "none" = zero CTC channel
    "smplx_model_dir": "",        # "" -> data_path_1 + "smplx_models/"
    "eval_split": "val",
    "paper_protocol": False,
    # Choice of each window's VQ codes from the generator's logits (trainers/generate.py choose_codes): temperature 0
    # = argmax (the published test; --paper_protocol always uses it), > 0 = sampled, from the top_k codes (0 = all).
    "code_temperature": 1.0,
    "code_top_k": 0,
    "code_hold": 4,               # frames that share one draw of the sampling noise (1 = a new draw every frame)
    # Sampling only: the upper body's (arms') codes are chosen once per block of code_block_upper frames, among the
    # block's code_top_k_upper best codes (by mean log-probability; 0 = all), so arm strokes are held instead of
    # averaging out to small movements around the rest pose (0 = frame by frame, like the other parts).
    "code_block_upper": 8,
    "code_top_k_upper": 16,
    # Default protocol only: the root's floor position is pulled back towards where the sequence started with this
    # time constant (s), so that a bias of the predicted root velocity does not add up to a walk (0 = off).
    "root_anchor_seconds": 1.5,
    "metric_compat": True,        # test.py: the published metric quirks (spec §10.3 #2-#5); false = corrected metrics
    "eval_period": 1,             # evaluate on eval_split every N epochs
    "pretrained_vq_dir": "",      # "" -> data_path_1 + "pretrained_vq/"
    "vq_fixes": True,             # stage-1 bug fixes (spec §10.3 #9, #10)
    "vq_codebook_init": "uniform",  # stage-1 codebook init: uniform (published) | data (encoder outputs of a batch)
    "vq_restart_period": 0,  # stage-1: every N steps move codes no frame of the batch chose onto encoder outputs (0: never, published)
}

# Keys that take a boolean or the word "auto" (decided at run time, e.g. by the device).
AUTO_BOOL_KEYS = ("cuda_graph",)

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
_NONE = {"none", "null", "~"}


def _type_name(x):
    return "null" if x is None else type(x).__name__


def _coerce_scalar(key, value, ref):
    """Convert `value` to the type of `ref` (a non-None scalar), or raise ValueError naming the key."""
    bad = ValueError(f"config key '{key}': expected {type(ref).__name__}, got {_type_name(value)} {value!r}")
    if isinstance(ref, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if isinstance(ref, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if isinstance(ref, float):
        # YAML 1.1 reads "5e-4" as a string, so numeric strings must be accepted
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if isinstance(ref, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"config key '{key}': unsupported default type {type(ref).__name__}")


def _coerce(key, value, ref):
    """Convert `value` to the type of the reference value `ref` (default, or YAML value when default is None)."""
    nullable = DEFAULTS[key] is None
    if value is None or (nullable and isinstance(value, str) and value.lower() in _NONE):
        if nullable:
            return None
        raise ValueError(f"config key '{key}': expected {type(ref).__name__}, got null")
    if ref is None:  # no type information: take the value as YAML would
        return yaml.safe_load(value) if isinstance(value, str) else value
    if isinstance(ref, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        if not ref:
            return list(items)
        return [_coerce_scalar(key, v, ref[0]) for v in items]
    if key in AUTO_BOOL_KEYS:
        if isinstance(value, str) and value.lower() == "auto":
            return "auto"
        try:
            return _coerce_scalar(key, value, True)
        except ValueError:
            raise ValueError(f"config key '{key}': expected true, false or auto, got {_type_name(value)} {value!r}") \
                from None
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"config key '{key}': expected {type(ref).__name__}, got {_type_name(value)} {value!r}")
    return _coerce_scalar(key, value, ref)


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of key: value at the top level, got {_type_name(data)}")
    unknown = [k for k in data if k not in DEFAULTS and k not in DERIVED_KEYS]
    if unknown:
        raise ValueError(f"{path}: unknown config key(s): {', '.join(map(str, unknown))}")
    return {k: v for k, v in data.items() if k not in DERIVED_KEYS}


def _resolve(path, file_values, overrides):
    """Merge defaults < file < overrides, validating every value; returns a Namespace with derived fields."""
    cfg = dict(DEFAULTS)
    for key, value in file_values.items():
        try:
            cfg[key] = _coerce(key, value, DEFAULTS[key])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for key, value in overrides.items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown config key '{key}'")
        ref = DEFAULTS[key] if DEFAULTS[key] is not None else cfg[key]
        cfg[key] = _coerce(key, value, ref)
    name = os.path.basename(str(path))
    for ext in (".yaml", ".yml"):
        name = name.removesuffix(ext)
    if cfg["is_train"]:
        name = time.strftime("%m%d_%H%M%S_") + name
    cfg["name"] = name
    cfg["config_path"] = str(path)
    return argparse.Namespace(**cfg)


def load_config(path, overrides=None):
    """Load a YAML config with optional {key: value} overrides (same validation as the command line)."""
    return _resolve(path, _read_yaml(path), dict(overrides or {}))


def build_parser():
    """The command-line parser: -c/--config plus --<key> for every key of DEFAULTS.

    Entry points with extra options (e.g. infer.py --audio) add them to this parser and pass it to parse_args."""
    p = argparse.ArgumentParser(allow_abbrev=False, usage="%(prog)s [-c CONFIG] [--key value ...]",
                                description="Any config key can be given as --key value (lists: --key a b c).")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    for key, default in DEFAULTS.items():
        nargs = "*" if isinstance(default, list) else None
        # SUPPRESS: only keys actually given on the command line appear in the result
        p.add_argument(f"--{key}", nargs=nargs, default=argparse.SUPPRESS, metavar="V", help=f"default: {default!r}".replace("%", "%%"))
    return p


def parse_args(argv=None, parser=None):
    """Command line > YAML (--config) > DEFAULTS. Errors exit with a message naming the key.

    `parser` (from build_parser(), with extra options added) lets an entry point parse its own options too;
    they are attached to the result unchanged."""
    parser = parser or build_parser()
    cli = vars(parser.parse_args(argv))
    path = cli.pop("config")
    extra = {k: cli.pop(k) for k in list(cli) if k not in DEFAULTS}
    try:
        args = _resolve(path, _read_yaml(path), cli)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    for k, v in extra.items():
        setattr(args, k, v)
    return args


def save_config(args, path):
    """Write the resolved config (every key, plus the derived name) as YAML, atomically."""
    cfg = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    data = {k: cfg[k] for k in DEFAULTS if k in cfg}
    for k in DERIVED_KEYS:
        if k in cfg:
            data[k] = cfg[k]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False, default_flow_style=None)
