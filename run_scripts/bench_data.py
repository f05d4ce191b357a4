"""Data pipeline figures on the real BEAT2 sample: cache build time without and with the CTC model, and dataset read
throughput in windows per second (targets: build < 30 s without CTC, reads > 5,000 windows/s).

    python run_scripts/bench_data.py [--sample ../shared/beat2_sample] [--ctc_model facebook/wav2vec2-base-960h]

The sample's csv marks its one sequence `test`; the benchmark links its files into a temporary dataset whose csv
marks it train and test. Without the real wav2vec2 model offline, two randomly initialised Wav2Vec2ForCTC stand in
(a tiny one, and one of wav2vec2-base's architecture, whose cost is the real model's), and the output says so.
"""
import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders import beat2, beat_sep_lower  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.log import setup_logging  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ID = "2_scott_0_1_1"


def make_dataset(sample, root):
    root.mkdir(parents=True)
    for sub in ("smplxflame_30", "wave16k", "textgrid", "weights"):
        (root / sub).symlink_to(sample / sub)
    (root / "train_test_split.csv").write_text(f"id,type\n{SAMPLE_ID},train\n{SAMPLE_ID},test\n")
    return root


def random_ctc_dir(out, tiny):
    """A randomly initialised Wav2Vec2ForCTC saved to `out`: tiny (hidden 32, 1 layer, conv stride 320 like the
    real one) or with the default config, which is wav2vec2-base's architecture (same compute as the real model)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=32)
    if tiny:
        config = Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37, conv_dim=(32, 32), conv_stride=(5, 64), conv_kernel=(10, 64),
                                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    Wav2Vec2ForCTC(config).save_pretrained(out)
    return str(out)


def timed_build(data, cache_root, split, ctc_model):
    args = load_config(REPO / "configs/mambatalk.yaml",
                       {"data_path": f"{data}/", "root_path": f"{cache_root}/", "ctc_model": ctc_model})
    if ctc_model != "none":
        beat2.load_ctc_model(ctc_model)  # model loading is not part of the build
    start = time.perf_counter()
    ds = beat_sep_lower.CustomDataset(args, split)
    return ds, time.perf_counter() - start


def read_rate(ds, n):
    order = np.random.default_rng(0).integers(0, len(ds), n)
    start = time.perf_counter()
    for k in order:
        ds[int(k)]
    return n / (time.perf_counter() - start)


def loader_rate(ds, batches):
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, drop_last=True, num_workers=0)
    n, start = 0, time.perf_counter()
    while n < batches * 64:
        for batch in loader:
            n += batch["pose"].shape[0]
            if n >= batches * 64:
                break
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", default=str(REPO.parent / "shared" / "beat2_sample"))
    p.add_argument("--ctc_model", default="facebook/wav2vec2-base-960h")
    p.add_argument("--reads", type=int, default=20000)
    a = p.parse_args()
    setup_logging(level=logging.WARNING)
    print(f"machine: {os.cpu_count()} CPU cores visible, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(Path(a.sample), tmp / "data")
        beat_sep_lower.CustomDataset(load_config(REPO / "configs/mambatalk.yaml", {  # warm-up: imports, body model
            "data_path": f"{data}/", "root_path": f"{tmp}/warm/", "ctc_model": "none"}), "test")

        train, seconds = timed_build(data, tmp / "no_ctc", "train", "none")
        _, test_seconds = timed_build(data, tmp / "no_ctc", "test", "none")
        print(f"cache build, no CTC (ctc_model none): train {seconds:.2f} s, test {test_seconds:.2f} s "
              f"(1 file, 63.5 s of motion, 64.1 s of audio)")

        if beat2.load_ctc_model(a.ctc_model) is not None:
            models = {a.ctc_model: a.ctc_model}
        else:
            print(f"{a.ctc_model} is not available offline: timing randomly initialised stand-ins instead")
            models = {"tiny random Wav2Vec2ForCTC (hidden 32, 1 layer)": random_ctc_dir(tmp / "tiny", tiny=True),
                      "random Wav2Vec2ForCTC with wav2vec2-base's architecture (95M parameters, same compute)":
                      random_ctc_dir(tmp / "base", tiny=False)}
        for i, (which, ctc) in enumerate(models.items()):
            _, ctc_seconds = timed_build(data, tmp / f"ctc{i}", "train", ctc)
            print(f"cache build, with CTC [{which}]: train {ctc_seconds:.2f} s")

        _, reopen = timed_build(data, tmp / "no_ctc", "train", "none")
        print(f"dataset construction on a valid cache: {reopen:.3f} s")
        print(f"reads: {read_rate(train, a.reads):,.0f} windows/s (random __getitem__, {len(train)} windows of "
              f"64 frames + 34133 audio samples)")
        print(f"reads through DataLoader(batch_size=64, num_workers=0): {loader_rate(train, 100):,.0f} windows/s")


if __name__ == "__main__":
    main()
