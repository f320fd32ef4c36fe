"""A progress bar with step, loss, tokens/s (as of the last log step) and ETA (tqdm), on the main rank only."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        # In a log file (SLURM, CI) redraw every 30 s instead of every step.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=interval) if enabled else None

    def update(self, step: int) -> None:
        """Every step: host data only (reading the loss would wait for the device)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, loss: float, tokens_per_s: float) -> None:
        """At log steps: the loss and throughput of the last logged step."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
