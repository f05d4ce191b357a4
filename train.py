"""Train a stage-1 model or MambaTalk: python train.py --config configs/X.yaml [--key value ...].

Several processes: torchrun --nproc_per_node N train.py --config ... (DDP; NCCL on GPUs, gloo on CPU).
"""
from trainers import build_trainer
from utils.config import parse_args
from utils.log import run_cli


def main(argv=None):
    args = parse_args(argv)
    return build_trainer(args).fit()


if __name__ == "__main__":
    run_cli(main)
