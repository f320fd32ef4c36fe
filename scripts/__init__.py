"""Command-line tools (export, benchmarks, data preparation); importable for their library functions."""
