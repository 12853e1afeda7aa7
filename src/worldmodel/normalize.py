"""Normalizer: per-dimension mean/std of observations, actions, observation deltas and rewards.

Statistics are fitted once from the replay buffer (after prefill) and then frozen, so the regression targets do not
drift under the model while it trains. They are registered buffers, so they live in the model's state_dict and
every checkpoint carries them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FIELDS = ("obs", "action", "delta", "reward")


class Normalizer(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, min_std: float = 1e-3):
        super().__init__()
        self.min_std = min_std
        dims = {"obs": obs_dim, "action": action_dim, "delta": obs_dim, "reward": 1}
        for name, dim in dims.items():
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray) -> None:
        data = {"obs": obs, "action": action, "delta": next_obs - obs, "reward": np.reshape(reward, (-1, 1))}
        for name, values in data.items():
            values = torch.as_tensor(np.asarray(values, dtype=np.float64))
            # A constant dimension (CartPole's reward is always 1) gets the floor, not a division by zero.
            getattr(self, f"{name}_mean").copy_(values.mean(0))
            getattr(self, f"{name}_std").copy_(values.std(0, correction=0).clamp_min(self.min_std))
        self.fitted.fill_(True)

    def normalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return (x - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std")

    def denormalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x * getattr(self, f"{name}_std") + getattr(self, f"{name}_mean")
