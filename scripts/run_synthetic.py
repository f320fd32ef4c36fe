#!/usr/bin/env python
"""Thin CLI: the paper's synthetic tasks (Table 6). See eval/synthetic/train.py.

    python scripts/run_synthetic.py --task parity --arch paragru
    python scripts/run_synthetic.py --grid --config configs/synthetic/table6.yaml --out results/synthetic
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.synthetic.train import main  # noqa: E402

if __name__ == "__main__":
    main()
