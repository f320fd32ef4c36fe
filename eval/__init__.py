"""Evaluation: perplexity, lm-eval integration, the paper's synthetic tasks and table rendering.

Lands with issue #6 ("Evaluation and reproduction").
"""
