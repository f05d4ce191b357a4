"""Export a BEAT2-format motion file to animation tools: BVH and glTF 2.0 binary (.glb).

    python export.py --npy_path res_X.npz --format bvh glb --out outputs/export

Any BEAT2-layout npz (a result of test.py / infer.py or a dataset file). Writes <out>/<npz name>.bvh and .glb: the
55 SMPL-X joints (names and parents of SMPL-X, bone lengths from the body model for the npz's betas), y up, facing
+z; the glb also holds the skinned body mesh and, with the real SMPL-X, the expressions as morph targets. Units,
axes and Euler order: README "Use it in Blender / Unity / Unreal"; the library is utils/export_motion.py.
"""
import argparse

from utils.body_model import BodyModel
from utils.export_motion import BVH_UNITS, FORMATS, export_motion
from utils.log import run_cli, setup_logging


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npy_path", required=True, help="motion .npz (BEAT2 format)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), help="files to write")
    parser.add_argument("--out", default="outputs/export/", help="folder for the files")
    parser.add_argument("--smplx_model_dir", default="./pretrained/smplx_models/",
                        help="folder holding smplx/SMPLX_NEUTRAL_2020.npz; without it the stand-in body is used")
    parser.add_argument("--translation", action=argparse.BooleanOptionalAction, default=True,
                        help="move the root as the npz's trans does (--no-translation: stay at the first frame's "
                             "place)")
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate of the motion (default: the npz's mocap_frame_rate, else 30); frames are "
                             "written one for one, not resampled")
    parser.add_argument("--bvh_units", choices=list(BVH_UNITS), default="cm", help="BVH length unit (glb: metres)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    body = BodyModel(args.smplx_model_dir)
    paths = export_motion(args.npy_path, args.format, args.out, body, translation=args.translation, fps=args.fps,
                          bvh_units=args.bvh_units)
    for path in paths:
        print(path)


if __name__ == "__main__":
    run_cli(main)
