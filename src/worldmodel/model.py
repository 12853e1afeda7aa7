"""WorldModel (model=gru): encoder MLP -> GRU over (latent, action) -> heads for the *next* step.

At step t the model has seen obs_0..obs_t and actions a_0..a_t of the current episode and predicts what the env
returns for a_t: the next observation (as a normalized delta from obs_t), the reward and whether the episode
terminates. It never sees the observation it is asked to predict, which is what makes it a world model rather than
the seed notebook's autoencoder. The recurrent state is zeroed wherever `first` marks the start of an episode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.normalize import Normalizer


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))


class WorldModel(nn.Module):
    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        latent_dim: int = 32,
        hidden_dim: int = 128,
        reward_coef: float = 1.0,
        terminated_coef: float = 1.0,
    ):
        super().__init__()
        self.obs_dim, self.action_dim, self.latent_dim = obs_dim, action_dim, latent_dim
        self.reward_coef, self.terminated_coef = reward_coef, terminated_coef
        self.normalizer = Normalizer(obs_dim, action_dim)
        self.encoder = mlp(obs_dim, hidden_dim, latent_dim)
        self.rnn = nn.GRUCell(latent_dim + action_dim, latent_dim)
        # Heads read the recurrent state (history) next to the current input (a skip path for Markovian envs).
        head_in = 2 * latent_dim + action_dim
        self.next_obs_head = mlp(head_in, hidden_dim, obs_dim)
        self.reward_head = mlp(head_in, hidden_dim, 1)
        self.terminated_head = mlp(head_in, hidden_dim, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor) -> dict[str, torch.Tensor]:
        """obs [B, T, obs_dim], action [B, T, action_dim], first [B, T] -> normalized predictions per step."""
        norm = self.normalizer
        x = torch.cat([self.encoder(norm.normalize("obs", obs)), norm.normalize("action", action)], dim=-1)
        keep = (~first.bool()).unsqueeze(-1).to(x.dtype)
        h = x.new_zeros(x.shape[0], self.latent_dim)
        states = []
        for t in range(x.shape[1]):
            h = self.rnn(x[:, t], h * keep[:, t])
            states.append(h)
        features = torch.cat([torch.stack(states, dim=1), x], dim=-1)
        return {
            "delta": self.next_obs_head(features),
            "reward": self.reward_head(features).squeeze(-1),
            "terminated_logit": self.terminated_head(features).squeeze(-1),
        }

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over every step of a Batch. Each step's target is its own next_obs, never the next row's obs."""
        if not bool(self.normalizer.fitted):
            raise RuntimeError("WorldModel.normalizer must be fitted on data (normalizer.fit) before training")
        out = self(batch.obs, batch.action, batch.first)
        norm = self.normalizer
        terms = {
            "obs": F.mse_loss(out["delta"], norm.normalize("delta", batch.next_obs - batch.obs)),
            "reward": F.mse_loss(out["reward"], norm.normalize("reward", batch.reward.unsqueeze(-1)).squeeze(-1)),
            "terminated": F.binary_cross_entropy_with_logits(out["terminated_logit"], batch.terminated.float()),
        }
        total = terms["obs"] + self.reward_coef * terms["reward"] + self.terminated_coef * terms["terminated"]
        return total, terms

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions in the env's own units: next_obs, reward, and the probability of termination."""
        out = self(obs, action, first)
        norm = self.normalizer
        return {
            "next_obs": obs + norm.denormalize("delta", out["delta"]),
            "reward": norm.denormalize("reward", out["reward"].unsqueeze(-1)).squeeze(-1),
            "terminated_prob": torch.sigmoid(out["terminated_logit"]),
        }
