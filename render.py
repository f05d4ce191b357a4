"""Render a BEAT2-format motion file (poses, trans, betas, expressions) with its audio to an mp4, headless, on CPU.

    python render.py --npy_path res_X.npz --wav_path X.wav --save_dir outputs/render
    python render.py --npy_path res_X.npz --wav_path X.wav --gt_npz X.npz     # ground truth | result

Needs no display (EGL; also runs under `xvfb-run -a`). Writes <save_dir>/<npz name>.mp4. The library is
utils/video.py (render_npz).
"""
import argparse
import sys

from utils.log import setup_logging
from utils.video import RendererUnavailableError, render_npz


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npy_path", required=True, help="motion .npz (BEAT2 format, 30 fps)")
    parser.add_argument("--wav_path", default=None, help="audio to mux in (omitted: silent video)")
    parser.add_argument("--save_dir", default="outputs/render/")
    parser.add_argument("--gt_npz", default=None, help="ground-truth .npz shown left of the result")
    parser.add_argument("--width", "--render_video_width", type=int, default=1280)
    parser.add_argument("--height", "--render_video_height", type=int, default=720)
    parser.add_argument("--fps", "--render_video_fps", type=float, default=30,
                        help="video frame rate; the 30 fps motion is resampled by nearest frame")
    parser.add_argument("--translation", action=argparse.BooleanOptionalAction, default=False,
                        help="show the root translation (published: off, the body stays at the first frame's place)")
    parser.add_argument("--max_seconds", type=float, default=None, help="render only the first seconds")
    parser.add_argument("--smplx_model_dir", default="./pretrained/smplx_models/",
                        help="folder holding smplx/SMPLX_NEUTRAL_2020.npz; without it a stand-in body is drawn")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    try:
        path = render_npz(args.npy_path, args.wav_path, args.save_dir, width=args.width, height=args.height,
                          fps=args.fps, translation=args.translation, gt_npz=args.gt_npz,
                          max_seconds=args.max_seconds, smplx_model_dir=args.smplx_model_dir,
                          progress=not args.no_progress)
    except (ValueError, OSError) as e:  # bad input: a message, no traceback
        print(f"render.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RendererUnavailableError as e:
        print(f"render.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(path)


if __name__ == "__main__":
    main()
