"""Score decoding settings of a trained demo model on one split, with the one evaluator and both baselines.

    python run_scripts/demo_decoding.py [--out outputs/demo] [--seed N] [--split val|test] [--whole]
        [--settings 0:0 1:0 1:0:0]

Each setting is TEMPERATURE:TOP_K[:BLOCK_UPPER[:TOP_K_UPPER]] (0:0 = argmax; BLOCK_UPPER and TOP_K_UPPER default to
the config's code_block_upper and code_top_k_upper). Prints one line of metrics per setting, then the table with the
static-pose and other-recording baselines. `--whole` scores the val recordings as whole sequences, window after
window as the test split is, instead of the training's 64-frame windows (each of which is one window from the start
pose). This is how the default decoding was chosen (README, Decoding).
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
    p.add_argument("--whole", action="store_true", help="val: whole recordings instead of 64-frame windows")
    p.add_argument("--settings", nargs="+", default=["0:0", "0.7:0", "1:0"])
    p.add_argument("--seed", type=int, default=0, help="the demo's --seed (its sampling seed, as in its test)")
    opts = p.parse_args()
    demo.SEED = opts.seed
    from test import run_test
    from trainers.evaluate import format_table
    demo.DEMO = Path(opts.out)
    args = demo.demo_args(demo.GENERATOR[0], False)
    defaults = (args.code_block_upper, args.code_top_k_upper)
    rows, test_dir = {}, None
    split = opts.split + ("_whole" if opts.whole and opts.split == "val" else "")
    for spec in opts.settings:
        fields = spec.split(":")
        if not 2 <= len(fields) <= 4:
            p.error(f"setting {spec!r}: expected TEMPERATURE:TOP_K[:BLOCK_UPPER[:TOP_K_UPPER]]")
        args.code_temperature, args.code_top_k = float(fields[0]), int(fields[1])
        args.code_block_upper, args.code_top_k_upper = [int(f) for f in fields[2:]] + list(defaults[len(fields) - 2:])
        report, test_dir = run_test(args, ckpt=str(demo.DEMO / demo.GENERATOR[2]),
                                    out_dir=str(demo.DEMO / f"decoding_{split}_{spec}"), split=opts.split,
                                    whole=True if opts.whole else None)
        name = f"T={fields[0]} top-k={fields[1]} upper block={args.code_block_upper} top-k={args.code_top_k_upper}"
        rows[name] = report["metrics"]
        print(spec, {k: round(report["metrics"][k], 5) for k in KEYS if report["metrics"].get(k) is not None},
              flush=True)
    rows |= demo.baselines(Path(test_dir), args)
    print(format_table(rows))


if __name__ == "__main__":
    main()
