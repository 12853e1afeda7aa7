"""GRUWorldModel (model=gru): encoder MLP -> GRU over (latent, action) -> heads for the *next* step.

At step t the model has seen obs_0..obs_t and actions a_0..a_t of the current episode and predicts what the env
returns for a_t: the next observation (as a normalized delta from obs_t), the reward and whether the episode
terminates. It never sees the observation it is asked to predict, which is what makes it a world model rather than
the seed notebook's autoencoder. The recurrent state is zeroed wherever `first` marks the start of an episode.

With `open_loop_steps=k > 0`, each training sequence also ends with k steps where the model's own predicted
observation is fed back instead of the true one, so the error it is trained on includes what it will make when
imagining (the one-step loss alone lets small errors compound freely over a horizon).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.models.base import WorldModel, mlp, one_episode_each
from worldmodel.models.layers import gru_sequence


class GRUWorldModel(WorldModel):
    loss_terms = ("obs", "reward", "terminated", "open_loop")

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        latent_dim: int = 32,
        hidden_dim: int = 128,
        head_layers: int = 2,
        reward_coef: float = 1.0,
        terminated_coef: float = 1.0,
        open_loop_steps: int = 0,
        open_loop_coef: float = 1.0,
    ):
        super().__init__(obs_dim, action_dim)
        self.latent_dim, self.open_loop_steps, self.head_layers = latent_dim, int(open_loop_steps), int(head_layers)
        self.reward_coef, self.terminated_coef, self.open_loop_coef = reward_coef, terminated_coef, open_loop_coef
        self.encoder = mlp(obs_dim, hidden_dim, latent_dim)
        self.rnn = nn.GRUCell(latent_dim + action_dim, latent_dim)
        # Heads read the recurrent state (history) next to the current input (a skip path for Markovian envs).
        # conf/model/gru.yaml makes them linear (head_layers=1): as accurate on our envs and ~30% cheaper per update
        # (README, "Measured"). The argument's default stays 2, the heads of checkpoints saved before it existed.
        head_in = 2 * latent_dim + action_dim
        self.next_obs_head = mlp(head_in, hidden_dim, obs_dim, head_layers)
        self.reward_head = mlp(head_in, hidden_dim, 1, head_layers)
        self.terminated_head = mlp(head_in, hidden_dim, 1, head_layers)

    def _encode(self, obs_n: torch.Tensor, action_n: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.encoder(obs_n), action_n], dim=-1)

    def _heads(self, h: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized predictions from the recurrent state and the current input (any leading dims: [B, ...], [T, B, ...])."""
        heads = (self.next_obs_head, self.reward_head, self.terminated_head)
        if self.head_layers == 1:
            # Linear heads as one matmul per input: three heads would each send a gradient back into h and x, and
            # summing those cost more than the heads themselves at large batches. Reading h and x apart, rather than
            # their concatenation, spares a copy of both (32 MB and its gradient at batch 256 x 64 x 256).
            weight, bias = torch.cat([head[0].weight for head in heads]), torch.cat([head[0].bias for head in heads])
            H = h.shape[-1]
            out = F.linear(x, weight[:, H:], bias) + F.linear(h, weight[:, :H])
            delta, reward, logit = out.split([self.obs_dim, 1, 1], dim=-1)
        else:
            features = torch.cat([h, x], dim=-1)
            delta, reward, logit = (head(features) for head in heads)
        return {"delta": delta, "reward": reward.squeeze(-1), "terminated_logit": logit.squeeze(-1)}

    def _recur(self, x: torch.Tensor, first: torch.Tensor, h: torch.Tensor | None = None, time_major: bool = False):
        """Runs the GRU over x [B, T, F] (or [T, B, F] with time_major), zeroing the state where `first` is set (see
        layers.gru_sequence)."""
        return gru_sequence(self.rnn, x, first, h, time_major)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced: obs [B, T, D], action [B, T, A], first [B, T] -> normalized predictions per step."""
        return self._teacher_forced(obs, action, first)[0]

    def _teacher_forced(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor):
        """forward's predictions, plus the recurrent states [B, T, latent] and inputs [B, T, F] they were read from.

        Computed time-major, so that the encoder, the GRU and the heads pass their large activations along without
        transposing them: only the small inputs and outputs change layout (views). The encoder and heads run once
        over the whole sequence."""
        norm = self.normalizer
        obs, action, first = obs.transpose(0, 1), action.transpose(0, 1), first.transpose(0, 1)
        x = self._encode(norm.normalize("obs", obs), norm.normalize("action", action))
        states, _ = self._recur(x, first, time_major=True)
        out = {key: value.transpose(0, 1) for key, value in self._heads(states, x).items()}
        return out, states.transpose(0, 1), x.transpose(0, 1)

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over every step of a Batch. Each step's target is its own next_obs, never the next row's obs."""
        self.check_fitted()
        out, states, x = self._teacher_forced(batch.obs, batch.action, batch.first)
        terms = {**self._transition_terms(out, batch), "open_loop": self._open_loop_loss(batch, out, states)}
        total = (
            terms["obs"]
            + self.reward_coef * terms["reward"]
            + self.terminated_coef * terms["terminated"]
            + self.open_loop_coef * terms["open_loop"]
        )
        return total, terms

    def _open_loop_loss(self, batch, out: dict[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor:
        """MSE (in normalized obs units) of the last k steps predicted on the model's own observations.

        The same as imagine(obs[:, :c], action, first[:, :c]) with c = T - k, but the observed part reuses the
        teacher-forced pass (`out`, `states`: rows [0, c) saw exactly those inputs), so only the k imagined steps
        cost extra. A step is scored only while the imagined stretch stays inside one episode: once a `first` flag
        appears, the true observation there is a reset that no imagined step could predict.
        """
        k, T = self.open_loop_steps, batch.obs.shape[1]
        if k <= 0 or T < 2:
            return batch.obs.new_zeros(())
        k = min(k, T - 1)
        c = T - k  # rows [0, c) are observed, rows [c, T) imagined
        step = {key: value[:, c - 1] for key, value in out.items()}
        pred = self._imagine_steps(states[:, c - 1], step, batch.obs[:, c - 1], batch.action[:, c:])["obs"]
        pred = self.normalizer.normalize("obs", pred)
        target = self.normalizer.normalize("obs", batch.next_obs[:, c - 1 :])
        # Horizon 1 predicts next_obs[c-1], which needs no imagined input: it is the
        # teacher-forced loss again, so it is skipped here and horizons 2..k+1 are scored.
        pred, target = pred[:, 1:], target[:, 1:]
        inside = (torch.cumsum(batch.first[:, c:].long(), dim=1) == 0).unsqueeze(-1).to(pred.dtype)
        return ((pred - target) ** 2 * inside).sum() / (inside.sum() * pred.shape[-1]).clamp_min(1.0)

    def imagine(
        self,
        context_obs: torch.Tensor,
        actions: torch.Tensor,
        first: torch.Tensor | None = None,
        units: str = "env",
    ) -> dict[str, torch.Tensor]:
        """Observe context_obs [B, C, D] (+ actions[:, :C]), then roll out on own predictions with the remaining
        actions. Returns H = actions.shape[1] - C + 1 predictions (see models/base.py for the convention)."""
        norm = self.normalizer
        B, C = context_obs.shape[:2]
        if first is None:
            first = torch.zeros(B, C, dtype=torch.bool, device=context_obs.device)
        first = first.clone()
        first[:, 0] = True
        x = self._encode(norm.normalize("obs", context_obs), norm.normalize("action", actions[:, :C]))
        _, h = self._recur(x, first)
        result = self._imagine_steps(h, self._heads(h, x[:, -1]), context_obs[:, -1], actions[:, C:])
        if units == "normalized":
            result["obs"] = norm.normalize("obs", result["obs"])
        return result

    def _imagine_steps(
        self, h: torch.Tensor, out: dict[str, torch.Tensor], current: torch.Tensor, actions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """From state h and its heads' output `out` (the prediction for the step after obs `current`), imagines
        actions.shape[1] + 1 steps on the model's own predictions. Observations in env units."""
        norm = self.normalizer
        preds, rewards, terms = [], [], []
        for t in range(actions.shape[1] + 1):
            current = current + norm.denormalize("delta", out["delta"])
            preds.append(current)
            rewards.append(norm.denormalize("reward", out["reward"].unsqueeze(-1)).squeeze(-1))
            terms.append(torch.sigmoid(out["terminated_logit"]))
            if t < actions.shape[1]:
                x = self._encode(norm.normalize("obs", current), norm.normalize("action", actions[:, t]))
                h = self.rnn(x, h)
                out = self._heads(h, x)
        obs = torch.stack(preds, dim=1)
        return {"obs": obs, "reward": torch.stack(rewards, dim=1), "terminated_prob": torch.stack(terms, dim=1)}

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor | None = None) -> dict:
        out = self(obs, action, one_episode_each(obs) if first is None else first)
        return self._in_env_units(obs, out)
