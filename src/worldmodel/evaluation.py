"""Open-loop evaluation: how far ahead does a world model predict, next to the copy-last-observation baseline?

For every window of C + H - 1 consecutive transitions that stays inside one episode, the model observes the first C
observations (with their actions) and imagines H steps with the true actions (see models/base.py). At horizon h:
    nmse(h) = mean over obs dims d of  MSE_d(h) / Var_d
where Var_d is the variance of the true observations being predicted (all windows, all horizons), so 1.0 means "as
bad as always predicting the mean" whatever the env's units. The copy-last baseline predicts the last observed
observation at every horizon; every number comes with its baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from worldmodel.models.base import WorldModel
from worldmodel.replay import ReplayBuffer


def episode_window_starts(buffer: ReplayBuffer, length: int, stride: int = 1) -> np.ndarray:
    """Logical starts of windows [s, s + length) whose rows all belong to one episode (only the last row may end it)
    and to one stream (logical order runs stream after stream, and a stream's newest row may be mid-episode)."""
    if len(buffer) < length:
        return np.zeros(0, dtype=np.int64)
    rows = buffer[:]
    boundary = rows["terminated"] | rows["truncated"]
    boundary[buffer.newest_rows()] = True
    ends = np.concatenate([[0], np.cumsum(boundary)])
    starts = np.arange(0, len(buffer) - length + 1, stride)
    return starts[ends[starts + length - 1] - ends[starts] == 0]


@dataclass
class OpenLoopResult:
    context: int
    nmse: np.ndarray  # [H], index h-1 is horizon h
    copy_last_nmse: np.ndarray  # [H]
    reward_mse: np.ndarray  # [H]
    terminated_accuracy: float
    windows: int

    @property
    def horizon(self) -> int:
        return len(self.nmse)

    def report_horizons(self) -> list[int]:
        """1, 5, 10, ... and the last horizon: the points logged and tabulated."""
        return sorted({1, self.horizon, *range(5, self.horizon + 1, 5)})

    def as_dict(self) -> dict:
        hs = self.report_horizons()
        return {
            "context": self.context,
            "windows": self.windows,
            "nmse": {str(h): float(self.nmse[h - 1]) for h in hs},
            "copy_last_nmse": {str(h): float(self.copy_last_nmse[h - 1]) for h in hs},
            "reward_mse": {str(h): float(self.reward_mse[h - 1]) for h in hs},
            "terminated_accuracy": self.terminated_accuracy,
        }

    def scalars(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}terminated_accuracy": self.terminated_accuracy}
        for h in self.report_horizons():
            out[f"{prefix}nmse_h{h}"] = float(self.nmse[h - 1])
            out[f"{prefix}copy_last_nmse_h{h}"] = float(self.copy_last_nmse[h - 1])
            out[f"{prefix}reward_mse_h{h}"] = float(self.reward_mse[h - 1])
        return out


@torch.no_grad()
def open_loop(
    model: WorldModel, buffer: ReplayBuffer, context: int, horizon: int, max_windows: int = 2048, batch_size: int = 512
) -> OpenLoopResult | None:
    """Scores `model` on up to `max_windows` in-episode windows of `buffer` (evenly spread, so deterministic).
    Returns None when no episode in the buffer is long enough for one window."""
    length = context + horizon - 1
    starts = episode_window_starts(buffer, length)
    if len(starts) == 0:
        return None
    if len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(np.int64)]
    was_training = model.training
    model.eval()
    sums = {k: 0.0 for k in ("model", "copy", "reward", "target", "target_sq", "correct")}
    for chunk in np.array_split(starts, -(-len(starts) // batch_size)):
        b = buffer.gather(chunk, length)
        pred = model.imagine(b.obs[:, :context], b.action, b.first[:, :context])
        target = b.next_obs[:, context - 1 :].double()  # [B, H, D]
        sums["model"] += ((pred["obs"].double() - target) ** 2).sum(0)
        sums["copy"] += ((b.obs[:, context - 1 : context].double() - target) ** 2).sum(0)
        sums["reward"] += ((pred["reward"].double() - b.reward[:, context - 1 :].double()) ** 2).sum(0)
        sums["target"] += target.sum((0, 1))
        sums["target_sq"] += (target**2).sum((0, 1))
        sums["correct"] += ((pred["terminated_prob"] > 0.5) == b.terminated[:, context - 1 :]).sum().item()
    model.train(was_training)
    n = len(starts)
    mean = sums["target"] / (n * horizon)
    var = (sums["target_sq"] / (n * horizon) - mean**2).clamp_min(1e-12)  # per obs dim
    return OpenLoopResult(
        context=context,
        nmse=((sums["model"] / n) / var).mean(-1).cpu().numpy(),
        copy_last_nmse=((sums["copy"] / n) / var).mean(-1).cpu().numpy(),
        reward_mse=(sums["reward"] / n).cpu().numpy(),
        terminated_accuracy=sums["correct"] / (n * horizon),
        windows=n,
    )


@torch.no_grad()
def trajectory_figure(model: WorldModel, buffer: ReplayBuffer, context: int, horizon: int, max_dims: int = 6):
    """True vs imagined trajectory of one held-out window, one panel per observation dimension (None if no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = episode_window_starts(buffer, context + horizon - 1)
    if len(starts) == 0:
        return None
    b = buffer.gather(starts[len(starts) // 2 : len(starts) // 2 + 1], context + horizon - 1)
    was_training = model.training
    model.eval()
    pred = model.imagine(b.obs[:, :context], b.action, b.first[:, :context])["obs"][0].cpu().numpy()
    model.train(was_training)
    true = torch.cat([b.obs[0, :context], b.next_obs[0, context - 1 :]]).cpu().numpy()  # steps 0 .. C+H-1
    dims = min(true.shape[1], max_dims)
    fig, axes = plt.subplots(1, dims, figsize=(3.2 * dims, 2.6), squeeze=False)
    for d, ax in enumerate(axes[0]):
        ax.plot(range(len(true)), true[:, d], "k-", label="true")
        ax.plot(range(context, context + horizon), pred[:, d], "r--", label="imagined")
        ax.axvline(context - 0.5, color="gray", lw=0.8)
        ax.set_title(f"obs[{d}]", fontsize=9)
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_xlabel(f"step (context {context}, horizon {horizon})", fontsize=8)
    fig.tight_layout()
    return fig
