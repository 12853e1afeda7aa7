"""Open-loop evaluation: how far ahead does a world model predict, next to the copy-last-observation baseline?

For every window of C + H - 1 consecutive transitions that stays inside one episode, the model observes the first C
observations (with their actions) and imagines H steps with the true actions (see models/base.py). At horizon h:
    nmse(h) = mean over obs dims d of  MSE_d(h) / Var_d
where Var_d is the variance of the true observations being predicted (all windows, all horizons), so 1.0 means "as
bad as always predicting the mean" whatever the env's units. Dimensions that do not vary there are left out (their
variance, 0 up to rounding, would turn any error into an astronomical ratio), unless none varies. The copy-last
baseline predicts the last observed observation at every horizon; every number comes with its baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from worldmodel.models.base import WorldModel
from worldmodel.normalize import constant
from worldmodel.replay import ReplayBuffer


def episode_window_starts(buffer: ReplayBuffer, length: int, stride: int = 1) -> np.ndarray:
    """Logical starts of windows [s, s + length) whose rows all belong to one episode (only the last row may end it)
    and to one stream (logical order runs stream after stream, and a stream's newest row may be mid-episode)."""
    if len(buffer) < length:
        return np.zeros(0, dtype=np.int64)
    ends = _ends_before(buffer)
    starts = np.arange(0, len(buffer) - length + 1, stride)
    return starts[ends[starts + length - 1] - ends[starts] == 0]


def longest_episode(buffer: ReplayBuffer) -> int:
    """Transitions in the longest stretch of one episode that `buffer` holds (0 if empty)."""
    return int(np.bincount(_ends_before(buffer)[:-1]).max()) if len(buffer) else 0


def _ends_before(buffer: ReplayBuffer) -> np.ndarray:
    """[len + 1]: element i counts the episode ends (and stream ends) among logical rows 0 .. i-1."""
    flags = buffer.ring.read(slice(None), names=("terminated", "truncated"))  # not obs: a dataset's may be large
    boundary = flags["terminated"] | flags["truncated"]
    boundary[buffer.newest_rows()] = True
    return np.concatenate([[0], np.cumsum(boundary)])


@dataclass
class OpenLoopResult:
    context: int
    nmse: np.ndarray  # [H], index h-1 is horizon h
    copy_last_nmse: np.ndarray  # [H]
    reward_mse: np.ndarray  # [H]
    # Termination, predicted where terminated_prob > 0.5. A window stays inside one episode, so a true termination
    # can only be its last step (horizon H): accuracy over every step would be ~1 for a model that never predicts
    # one. Recall is over the true terminations, false alarms over the other steps (each None where there are none).
    terminations: int
    terminated_recall: float | None
    terminated_false_alarms: float | None
    windows: int  # scored: at most max_windows of the available ones, evenly spread
    available: int  # in-episode windows of C + H - 1 transitions in the buffer

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
            "windows_available": self.available,
            "nmse": {str(h): float(self.nmse[h - 1]) for h in hs},
            "copy_last_nmse": {str(h): float(self.copy_last_nmse[h - 1]) for h in hs},
            "reward_mse": {str(h): float(self.reward_mse[h - 1]) for h in hs},
            "terminations": self.terminations,
            "terminated_recall": self.terminated_recall,
            "terminated_false_alarms": self.terminated_false_alarms,
        }

    def scalars(self, prefix: str = "eval/") -> dict[str, float]:
        rates = {"terminated_recall": self.terminated_recall, "terminated_false_alarms": self.terminated_false_alarms}
        out = {f"{prefix}{name}": rate for name, rate in rates.items() if rate is not None}
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
    available = len(starts)
    if len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(np.int64)]
    was_training = model.training
    model.eval()
    sums = {k: 0.0 for k in ("model", "copy", "reward", "target", "target_sq", "caught", "terminal", "alarms")}
    for chunk in np.array_split(starts, -(-len(starts) // batch_size)):
        b = buffer.gather(chunk, length)
        pred = model.imagine(b.obs[:, :context], b.action, b.first[:, :context])
        target = b.next_obs[:, context - 1 :].double()  # [B, H, D]
        sums["model"] += ((pred["obs"].double() - target) ** 2).sum(0)
        sums["copy"] += ((b.obs[:, context - 1 : context].double() - target) ** 2).sum(0)
        sums["reward"] += ((pred["reward"].double() - b.reward[:, context - 1 :].double()) ** 2).sum(0)
        sums["target"] += target.sum((0, 1))
        sums["target_sq"] += (target**2).sum((0, 1))
        said, true = pred["terminated_prob"] > 0.5, b.terminated[:, context - 1 :]
        sums["caught"] += (said & true).sum().item()
        sums["terminal"] += true.sum().item()
        sums["alarms"] += (said & ~true).sum().item()
    model.train(was_training)
    n = len(starts)
    mean = sums["target"] / (n * horizon)
    var = (sums["target_sq"] / (n * horizon) - mean**2).clamp_min(0)  # per obs dim
    varies = ~constant(var.sqrt(), mean)
    var = var.clamp_min(1e-12)
    dims = varies if varies.any() else torch.ones_like(varies)
    return OpenLoopResult(
        context=context,
        nmse=((sums["model"] / n) / var)[..., dims].mean(-1).cpu().numpy(),
        copy_last_nmse=((sums["copy"] / n) / var)[..., dims].mean(-1).cpu().numpy(),
        reward_mse=(sums["reward"] / n).cpu().numpy(),
        terminations=int(sums["terminal"]),
        terminated_recall=sums["caught"] / sums["terminal"] if sums["terminal"] else None,
        terminated_false_alarms=sums["alarms"] / others if (others := n * horizon - sums["terminal"]) else None,
        windows=n,
        available=available,
    )


@torch.no_grad()
def trajectory(model: WorldModel, buffer: ReplayBuffer, context: int, horizon: int):
    """One held-out window (the middle one) as (true [C+H, D], imagined [H, D]) numpy arrays, or None if no window
    of C + H - 1 transitions stays inside one episode. True holds steps 0 .. C+H-1; imagined steps C .. C+H-1."""
    starts = episode_window_starts(buffer, context + horizon - 1)
    if len(starts) == 0:
        return None
    b = buffer.gather(starts[len(starts) // 2 : len(starts) // 2 + 1], context + horizon - 1)
    was_training = model.training
    model.eval()
    pred = model.imagine(b.obs[:, :context], b.action, b.first[:, :context])["obs"][0].cpu().numpy()
    model.train(was_training)
    true = torch.cat([b.obs[0, :context], b.next_obs[0, context - 1 :]]).cpu().numpy()
    return true, pred


class TrajectoryPlot:
    """True vs imagined trajectory, one panel per observation dimension (the first `max_dims`), as an RGB image.

    Every validation pass shows the same held-out window (the validation buffer never changes), so the axes, their
    ticks and the true trajectory are drawn once and kept as a bitmap; a pass restores it and draws only the imagined
    lines on top (matplotlib's blitting). Each panel's y-range is fixed by the true trajectory, so the images of
    successive passes compare at one scale in TensorBoard's step slider; an imagined value far outside it is cut at
    the panel's edge. Drawing the whole figure anew took ~180 ms a pass, 20% of the default run."""

    def __init__(self, obs_dim: int, context: int, horizon: int, max_dims: int = 6):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: ~0.3 s, and only for figures
        from matplotlib.figure import Figure  # the object API: kept out of pyplot's global registry of figures

        self.context = context
        dims = min(obs_dim, max_dims)
        self.figure = Figure(figsize=(3.2 * dims, 2.6))
        FigureCanvasAgg(self.figure)
        self.axes = self.figure.subplots(1, dims, squeeze=False)[0]
        self.true_lines = [ax.plot([], [], "k-", label="true")[0] for ax in self.axes]
        self.imagined_lines = [ax.plot([], [], "r--", label="imagined")[0] for ax in self.axes]
        for d, ax in enumerate(self.axes):
            ax.axvline(context - 0.5, color="gray", lw=0.8)
            ax.set_title(f"obs[{d}]", fontsize=9)
        self.axes[0].legend(fontsize=7)
        for line in self.imagined_lines:  # after the legend, whose sample line copies this flag
            line.set_animated(True)  # left out of full draws: drawn over the kept background only
        self.axes[0].set_xlabel(f"step (context {context}, horizon {horizon})", fontsize=8)
        # Fixed margins: tight_layout measures every text (~50 ms) for about the same answer.
        self.figure.subplots_adjust(left=0.6 / (3.2 * dims), right=0.99, bottom=0.2, top=0.88, wspace=0.28)
        self._true: np.ndarray | None = None
        self._background = None

    def image(self, true: np.ndarray, imagined: np.ndarray) -> np.ndarray:
        """The panels with these trajectories (trajectory's arrays), as uint8 [height, width, 3]."""
        canvas = self.figure.canvas
        if self._true is None or not np.array_equal(true, self._true):
            self._draw_background(true)
        canvas.restore_region(self._background)
        steps = np.arange(self.context, self.context + len(imagined))
        for d, (ax, line) in enumerate(zip(self.axes, self.imagined_lines)):
            line.set_data(steps, imagined[:, d])
            ax.draw_artist(line)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    def _draw_background(self, true: np.ndarray) -> None:
        for d, (ax, line) in enumerate(zip(self.axes, self.true_lines)):
            line.set_data(np.arange(len(true)), true[:, d])
            low, high = float(true[:, d].min()), float(true[:, d].max())
            pad = 0.25 * (high - low) or 0.1 * abs(high) or 1.0  # a flat line still gets a visible range
            ax.set_xlim(-0.5, len(true) - 0.5)
            ax.set_ylim(low - pad, high + pad)
        self.figure.canvas.draw()
        self._background = self.figure.canvas.copy_from_bbox(self.figure.bbox)
        self._true = true.copy()
