"""Normalizer: per-dimension mean/std of observations, actions, observation deltas and rewards.

Statistics are fitted once from the replay buffer (after prefill) and then frozen, so the regression targets do not
drift under the model while it trains. They are registered buffers, so they live in the model's state_dict and
every checkpoint carries them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


def constant(std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Which dimensions did not vary: std below 1e-6 of the mean's magnitude (float32 rounding), or below 1e-8."""
    return std <= torch.clamp_min(1e-6 * mean.abs(), 1e-8)


class Normalizer(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int):
        super().__init__()
        dims = {"obs": obs_dim, "action": action_dim, "delta": obs_dim, "reward": 1}
        for name, dim in dims.items():
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray) -> None:
        self.fit_chunks([(obs, action, reward, next_obs)])

    @torch.no_grad()
    def fit_chunks(self, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """`fit` on data given in row chunks of (obs, action, reward, next_obs): a buffer that fills most of the
        memory is never copied whole (nor converted to float64 whole). Per chunk, mean and variance in float64;
        chunks are merged exactly (Chan et al.); one chunk gives, to the bit, the numbers of the data taken at once."""
        stats: dict[str, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        for obs, action, reward, next_obs in chunks:
            if len(obs) == 0:  # its mean is NaN, which merging would spread
                continue
            # The delta in at least float32, as the loss computes its targets from the stored float16 observations
            # (ReplayBuffer batches are float32): a float16 difference rounds, and overflows to inf beyond 65504.
            delta = np.subtract(next_obs, obs, dtype=np.result_type(np.asarray(next_obs).dtype, np.float32))
            data = {"obs": obs, "action": action, "delta": delta, "reward": np.reshape(reward, (-1, 1))}
            for name, values in data.items():
                values = torch.as_tensor(np.asarray(values, dtype=np.float64))
                n, mean, var = len(values), values.mean(0), values.var(0, correction=0)
                std = values.std(0, correction=0)  # its last bit can differ from var.sqrt()'s
                if name in stats:
                    n0, mean0, var0, _ = stats[name]
                    total, step = n0 + n, mean - mean0
                    mean = mean0 + step * (n / total)
                    var = (n0 * var0 + n * var) / total + step**2 * (n0 * n / total**2)
                    n, std = total, None
                stats[name] = (n, mean, var, std)
        if not stats:  # the mean of no rows is NaN, which every target would inherit
            raise ValueError("Normalizer.fit needs at least one row of data")
        for name, (_, mean, var, std) in stats.items():
            std = var.sqrt() if std is None else std
            # A dimension that did not vary in the fitted data (CartPole's reward; Acrobot's, -1 until an episode
            # terminates; a one-hot action the prefill never took) is only centered, std 1. A small floor instead
            # (1e-3, once) makes any later value a huge target: one Acrobot termination in the held-out data gave
            # val/loss 500 for some seeds. Small but varying dimensions keep their own scale, however small.
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(torch.where(constant(std, mean), torch.ones_like(std), std))
        self.fitted.fill_(True)

    def normalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mean = getattr(self, f"{name}_mean")
        if x.shape[-1] != len(mean):  # broadcasting would hide it: [..., 1] action indices against 2 one-hot columns
            hint = " (a Discrete env's actions are one-hot, as ReplayBuffer stores them)" if name == "action" else ""
            raise ValueError(f"{name} has {x.shape[-1]} values in its last dimension; the model takes {len(mean)}{hint}")
        return (x - mean) / getattr(self, f"{name}_std")

    def denormalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x * getattr(self, f"{name}_std") + getattr(self, f"{name}_mean")
