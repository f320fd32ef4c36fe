#!/usr/bin/env python
"""Thin CLI: result files -> the paper's Table 5 / Table 6 (markdown + plots). See eval/tables.py.

    python scripts/render_tables.py --synthetic results/synthetic --perplexity results/ppl --lm-eval results/lm_eval --out tables
"""
import sys
from pathlib import Path

from pararnn_lm.eval.tables import main

if __name__ == "__main__":
    main()
