"""The one interface every world model implements, so the trainer and the evaluator never branch on model type.

Data convention (see ReplayBuffer): row t of a sequence holds obs_t, action_t and the env's answer to it: next_obs_t,
reward_t, terminated_t. `first` marks rows where a new episode starts (the model must forget its history there).

Open-loop convention: `imagine(context_obs [B, C, D], actions [B, C+H-1, A])` observes obs_0..obs_{C-1} with
actions_0..actions_{C-1}, then predicts next_obs_{C-1} (horizon 1), and keeps going on its own predictions with
actions_C..actions_{C+H-2}: prediction k (horizon k) is next_obs_{C+k-2}. So horizon 1 is one-step prediction from
the full context, and horizon H is H steps past the last true observation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from worldmodel.normalize import Normalizer


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """Linear -> LayerNorm -> SiLU blocks, then a linear output: the usual stable MLP of model-based RL."""
    blocks, width = [], in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU()]
        width = hidden_dim
    return nn.Sequential(*blocks, nn.Linear(width, out_dim))


class WorldModel(nn.Module, ABC):
    """Base of every world model: it owns a Normalizer fitted on data, a loss on sampled sequences, and `imagine`."""

    #: Names of the loss terms `loss` returns besides the total (the trainer logs train/<term> and val/<term>).
    loss_terms: tuple[str, ...] = ("obs", "reward", "terminated")

    def __init__(self, obs_dim: int, action_dim: int):
        super().__init__()
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.normalizer = Normalizer(obs_dim, action_dim)

    def fit_normalizer(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray) -> None:
        self.normalizer.fit(obs, action, reward, next_obs)

    def fit_normalizer_chunks(self, chunks) -> None:
        """fit_normalizer on (obs, action, reward, next_obs) row chunks (Normalizer.fit_chunks)."""
        self.normalizer.fit_chunks(chunks)

    def check_fitted(self) -> None:
        # Reading the flag from a CUDA tensor would stall every training step on the GPU, so a pass is remembered.
        if not getattr(self, "_fitted_seen", False):
            if not bool(self.normalizer.fitted):
                raise RuntimeError(f"{type(self).__name__}.normalizer must be fitted on data before training")
            self._fitted_seen = True

    def load_state_dict(self, *args, **kwargs):
        self._fitted_seen = False  # the loaded normalizer may not be fitted
        return super().load_state_dict(*args, **kwargs)

    @abstractmethod
    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, {term: value for term in loss_terms}, in loss_terms order) averaged over a Batch [B, T, ...]."""

    @abstractmethod
    def imagine(
        self, context_obs: torch.Tensor, actions: torch.Tensor, first: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Open-loop rollout in env units: {"obs": [B, H, D], "reward": [B, H], "terminated_prob": [B, H]}."""

    def predict(
        self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced one-step predictions in env units for obs [B, T, D], action [B, T, A]: {"next_obs":
        [B, T, D], "reward": [B, T], "terminated_prob": [B, T]}. `first` [B, T] marks the rows where an episode
        starts; None: each sequence is one episode. For using a trained model (README, "Load a trained model back");
        training and evaluation need only loss and imagine, so a new model may leave it out."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict")

    # ---- for models whose heads predict the normalized change in observation, the reward and the termination ----
    # Their output is a dict with "delta" [..., D] (normalized next_obs - obs), "reward" [...] (normalized) and
    # "terminated_logit" [...]: gru.py and rssm.py use these two helpers.
    def _transition_terms(self, out: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        """The loss terms of those heads' output `out` for a Batch, in normalized units."""
        norm = self.normalizer
        return {
            "obs": F.mse_loss(out["delta"], norm.normalize("delta", batch.next_obs - batch.obs)),
            "reward": F.mse_loss(out["reward"], norm.normalize("reward", batch.reward.unsqueeze(-1)).squeeze(-1)),
            "terminated": F.binary_cross_entropy_with_logits(out["terminated_logit"], batch.terminated.float()),
        }

    def _in_env_units(self, obs: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Those heads' output for the step after `obs` as predict returns it."""
        norm = self.normalizer
        return {
            "next_obs": obs + norm.denormalize("delta", out["delta"]),
            "reward": norm.denormalize("reward", out["reward"].unsqueeze(-1)).squeeze(-1),
            "terminated_prob": torch.sigmoid(out["terminated_logit"]),
        }


def one_episode_each(obs: torch.Tensor) -> torch.Tensor:
    """`first` [B, T] for sequences obs [B, T, D] that each start an episode at row 0 and stay in it."""
    first = torch.zeros(obs.shape[:-1], dtype=torch.bool, device=obs.device)
    first[..., 0] = True
    return first
