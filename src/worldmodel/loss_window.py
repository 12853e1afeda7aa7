"""LossWindow: the loss terms of every update between two logs, kept on the training device.

Reading a loss back to the host makes the host wait for the GPU, so an update never does: it copies its
[loss, *terms] into a row here (one launch, no sync). At log time, and before each checkpoint, the rows are summed
and checked for NaN/inf in one read-back, which also finds the exact update and term where a divergence began.
"""

from __future__ import annotations

import torch

from worldmodel.errors import WorldModelError

ROWS = 1024  # most rows allocated at first (doubled when more updates than that come between two logs)


class Diverged(WorldModelError):
    """A loss term or the weights became non-finite at update `step`. Trainer.fit adds which checkpoint is the last
    good one."""

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        super().__init__(f"Training diverged: {what} became non-finite at update {step}")


class LossWindow:
    def __init__(self, terms: tuple[str, ...], device: torch.device, log_every: int):
        self.terms = tuple(terms)
        self.values = torch.empty(min(log_every, ROWS), len(self.terms), device=device)
        self.rows = 0  # rows filled: updates start, start + 1, ...
        self.start = 0
        self.updates = 0  # the window's updates: its rows, and those `sums` carries
        # Sums of updates that have no row: a checkpoint written before the rows were saved carries its window so.
        self.sums = torch.zeros(len(self.terms), device=device)

    def add(self, step: int, values: torch.Tensor) -> None:
        if self.rows == 0:
            self.start = step
        if self.rows == len(self.values):
            self.values = torch.cat([self.values, torch.empty_like(self.values)])
        self.values[self.rows] = values
        self.rows += 1
        self.updates += 1

    def check_finite(self) -> torch.Tensor:
        """The window's sums per term; raises Diverged at the first update with a non-finite term, naming the terms
        that were non-finite then (later ones follow from it)."""
        rows = self.values[: self.rows]
        sums = self.sums + rows.sum(0)
        if not len(rows):
            return sums
        steps = torch.arange(self.start, self.start + len(rows), device=rows.device)
        bad = ~torch.isfinite(rows)
        first = torch.where(bad, steps[:, None], torch.iinfo(torch.long).max).amin(0)
        first = torch.where(bad.any(0), first, -1).tolist()  # the one read-back
        bad_steps = [s for s in first if s >= 0]
        if bad_steps:
            step = min(bad_steps)
            raise Diverged(step, ", ".join(f"train/{name}" for s, name in zip(first, self.terms) if s == step))
        return sums

    def flush(self) -> dict[str, float]:
        """train/<term>: the means over the window's updates; the next window starts empty."""
        means = (self.check_finite() / self.updates).tolist()
        self.rows = self.updates = 0
        self.sums.zero_()
        return {f"train/{name}": v for name, v in zip(self.terms, means)}

    def state_dict(self) -> dict:
        # The rows themselves, so a resumed run sums the same rows in the same order as one that never stopped.
        return {"window_values": self.values[: self.rows].clone(), "window_sums": self.sums,
                "window_updates": self.updates}  # fmt: skip

    def load_state_dict(self, state: dict, step: int) -> None:
        """`state` as saved after update `step`. (A checkpoint never holds a non-finite value: check_finite runs
        before every save.)"""
        device = self.values.device
        rows = state.get("window_values", self.values[:0]).to(device)
        self.values = torch.cat([rows, torch.empty_like(self.values)])
        self.rows, self.start = len(rows), step - len(rows) + 1
        self.updates = state["window_updates"]
        self.sums = state["window_sums"].to(device, copy=True)  # not a view of a mapped checkpoint file
