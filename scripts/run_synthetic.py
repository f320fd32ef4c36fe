#!/usr/bin/env python
"""Thin CLI: the paper's synthetic tasks (Table 6). See eval/synthetic/train.py.

    python scripts/run_synthetic.py --task parity --arch paragru
    python scripts/run_synthetic.py --grid --config configs/synthetic/table6.yaml --out results/synthetic
"""
import sys
from pathlib import Path

from pararnn_lm.eval.synthetic.train import main

if __name__ == "__main__":
    main()
