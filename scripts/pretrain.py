"""Pretraining entry point (a thin wrapper of ``moe-gen pretrain``), also for torchrun.

Usage:
    python scripts/pretrain.py --config demo                      # same as `moe-gen pretrain --config demo`
    python scripts/pretrain.py --config debug --train.steps 50 --output runs/debug
    torchrun --nproc_per_node 2 scripts/pretrain.py --config debug --train.expert_parallel 2 --output runs/ep2
"""

import sys

from moe_gen.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
