"""Score decoding settings of a trained demo model on one split, with the one evaluator and both baselines.

    python run_scripts/demo_decoding.py [--out outputs/demo] [--split val|test] [--settings 0:0 0.7:0 1:0 1:8]

Each setting is TEMPERATURE:TOP_K (0:0 = argmax). Prints one line of metrics per setting, then the table with the
static-pose and other-recording baselines. This is how the default `code_temperature` was chosen (README, Decoding).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_scripts.demo as demo  # noqa: E402  (also moves to the repository root)

KEYS = ("fgd", "bc", "bc_gt", "l1div", "l1div_gt", "energy", "energy_gt", "energy_ratio", "root_jump", "root_drift",
        "root_drift_gt")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo", help="the demo's output folder (its --out)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--settings", nargs="+", default=["0:0", "0.7:0", "1:0"])
    opts = p.parse_args()
    from test import run_test
    from trainers.evaluate import format_table
    demo.DEMO = Path(opts.out)
    args = demo.demo_args(demo.GENERATOR[0], False)
    rows, test_dir = {}, None
    for spec in opts.settings:
        temperature, top_k = spec.split(":")
        args.code_temperature, args.code_top_k = float(temperature), int(top_k)
        report, test_dir = run_test(args, ckpt=str(demo.DEMO / demo.GENERATOR[2]),
                                    out_dir=str(demo.DEMO / f"decoding_{opts.split}_{spec}"), split=opts.split)
        rows[f"T={temperature} top-k={top_k}"] = report["metrics"]
        print(spec, {k: round(report["metrics"][k], 5) for k in KEYS if report["metrics"].get(k) is not None},
              flush=True)
    rows |= demo.baselines(Path(test_dir), args)
    print(format_table(rows))


if __name__ == "__main__":
    main()
