"""EnsembleWorldModel (model=mlp_ensemble): a PETS/MBPO-style probabilistic ensemble of E Markovian MLPs.

Each member maps (obs_t, action_t) to a diagonal Gaussian over [normalized delta = next_obs_t - obs_t, normalized
reward_t] plus a termination logit. The MLP sees one row at a time, so history and `first` play no role: every row
is a valid training pair, and `imagine` only needs the last context observation.

* Members are batched weights [E, in, out] applied with one batched matmul per layer, never a loop over members.
* Log-variances are soft-clamped between learned per-member bounds (max_logvar, min_logvar), with a small penalty
  that pulls the bounds together, as in PETS: the variance cannot run off to 0 or infinity on unseen inputs.
* Bootstrap: each member trains on its own resample (with replacement, from torch's global RNG, so seeded runs
  repeat) of the batch's B*T rows. A resample is applied as per-row counts weighting one shared forward pass, which
  gives exactly the gradient of the gathered-rows loss, and lets the same pass report the ensemble-mean error on the
  plain rows. In eval mode (validation) there is no resampling: every member scores every row, deterministically.
* latent_dim is the width of each member's last hidden layer (the feature layer the output heads read), hidden_dim
  the width of the layers before it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.models.base import WorldModel


class EnsembleLinear(nn.Module):
    """E independent linear layers: x [E, N, in] (or [N, in], shared by every member) -> [E, N, out]."""

    def __init__(self, ensemble_size: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.expand(self.weight.shape[0], *x.shape)  # a view: the shared input is not copied
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleWorldModel(WorldModel):
    # total = nll + terminated_coef * terminated (+ logvar_coef * (sum max_logvar - sum min_logvar) in training only).
    # "nll" and "terminated" are what is optimized (member-wise, on each member's bootstrap resample in training);
    # "obs" and "reward" are diagnostics: the plain MSE of the ensemble-mean prediction, comparable across models.
    loss_terms = ("obs", "reward", "terminated", "nll")

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        latent_dim: int = 200,
        hidden_dim: int = 200,
        ensemble_size: int = 5,
        num_layers: int = 3,
        bootstrap: bool = True,
        propagation: str = "mean",
        terminated_hidden: int = 32,
        terminated_coef: float = 10.0,
        logvar_coef: float = 0.01,
    ):
        super().__init__(obs_dim, action_dim)
        if propagation not in ("mean", "members"):
            raise ValueError(f"propagation must be 'mean' or 'members', not {propagation!r}")
        self.latent_dim, self.ensemble_size, self.bootstrap = int(latent_dim), int(ensemble_size), bool(bootstrap)
        self.propagation, self.terminated_coef, self.logvar_coef = propagation, terminated_coef, logvar_coef
        widths = [obs_dim + action_dim] + [hidden_dim] * (int(num_layers) - 1) + [latent_dim]
        self.layers = nn.ModuleList(EnsembleLinear(ensemble_size, i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.out_dim = obs_dim + 1  # Gaussian over [delta, reward]
        self.head = EnsembleLinear(ensemble_size, latent_dim, 2 * self.out_dim)
        # Termination is a threshold of the next state (e.g. CartPole's |angle| > 12 deg), which a linear readout of
        # features shaped by the Gaussian NLL draws poorly: it gets a (narrow, so cheap) hidden layer of its own.
        self.terminated_head = nn.Sequential(
            EnsembleLinear(ensemble_size, latent_dim, terminated_hidden),
            nn.SiLU(),
            EnsembleLinear(ensemble_size, terminated_hidden, 1),
        )
        # Start from "almost never terminates" (p ~ 5%): from p = 0.5, the first updates' large BCE gradients (x
        # terminated_coef) inflate Adam's second moments in the shared trunk, which beta2 = 0.999 remembers for ~1k
        # updates, slowing everything else (measured: 20-90x worse reward error on tests/test_model_zoo.py's system).
        nn.init.constant_(self.terminated_head[-1].bias, -3.0)
        self.max_logvar = nn.Parameter(torch.full((ensemble_size, 1, self.out_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((ensemble_size, 1, self.out_dim), -10.0))

    def forward(self, obs_n: torch.Tensor, action_n: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized obs [N, D], action [N, A] (shared by all members) or [E, N, .] -> per-member mean [E, N, D+1],
        logvar [E, N, D+1] and terminated_logit [E, N]."""
        if obs_n.dim() != action_n.dim():  # per-member observations (rollouts), shared actions
            E = self.ensemble_size
            obs_n, action_n = obs_n.expand(E, *obs_n.shape[-2:]), action_n.expand(E, *action_n.shape[-2:])
        x = torch.cat([obs_n, action_n], dim=-1)
        for layer in self.layers:
            x = F.silu(layer(x))
        mean, logvar = self.head(x).chunk(2, dim=-1)
        term = self.terminated_head(x)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return {"mean": mean, "logvar": logvar, "terminated_logit": term.squeeze(-1)}

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_fitted()
        norm, D = self.normalizer, self.obs_dim
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  [B, T, ...] -> [N, ...]
        obs, action, next_obs = flat(batch.obs), flat(batch.action), flat(batch.next_obs)
        target = torch.cat(
            [norm.normalize("delta", next_obs - obs), norm.normalize("reward", flat(batch.reward).unsqueeze(-1))], -1
        )
        terminated = flat(batch.terminated).float()
        out = self(norm.normalize("obs", obs), norm.normalize("action", action))
        E, N = self.ensemble_size, obs.shape[0]
        if self.training and self.bootstrap:
            # counts[e, i] = how often row i appears in member e's resample of N rows drawn with replacement.
            idx = torch.randint(N, (E, N), device=obs.device)
            weight = torch.zeros(E, N, device=obs.device).scatter_add_(1, idx, torch.ones(E, N, device=obs.device))
        else:
            weight = torch.ones(E, N, device=obs.device)
        weight = weight / (E * N)  # each member's resample has N rows: this is the mean over members and rows
        sq = (out["mean"] - target) ** 2
        nll = 0.5 * (sq * torch.exp(-out["logvar"]) + out["logvar"]).mean(-1)
        bce = F.binary_cross_entropy_with_logits(out["terminated_logit"], terminated.expand(E, N), reduction="none")
        mean = out["mean"].mean(0)  # ensemble mean [N, D+1]
        terms = {
            "obs": F.mse_loss(mean[:, :D], target[:, :D]),
            "reward": F.mse_loss(mean[:, D], target[:, D]),
            "terminated": (bce * weight).sum(),
            "nll": (nll * weight).sum(),
        }
        total = terms["nll"] + self.terminated_coef * terms["terminated"]
        if self.training:  # a regularizer of the bounds, like weight decay: not part of the validation objective
            total = total + self.logvar_coef * (self.max_logvar.sum() - self.min_logvar.sum())
        return total, terms

    def _step(self, obs: torch.Tensor, action_n: torch.Tensor):
        """One step in env units for obs [B, D] or per-member obs [E, B, D] -> (next_obs, reward, terminated_prob),
        each per member [E, B, ...]."""
        norm = self.normalizer
        out = self(norm.normalize("obs", obs), action_n)
        next_obs = obs + norm.denormalize("delta", out["mean"][..., : self.obs_dim])
        reward = norm.denormalize("reward", out["mean"][..., self.obs_dim :]).squeeze(-1)
        return next_obs, reward, torch.sigmoid(out["terminated_logit"])

    def imagine(
        self, context_obs: torch.Tensor, actions: torch.Tensor, first: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Open-loop rollout from the last context observation (the model is Markovian; `first` changes nothing).

        propagation="mean" (default): each step feeds the ensemble-mean next observation to every member, so the
        rollout is deterministic and the spread between members never compounds. propagation="members": each member
        rolls out on its own predictions (the deterministic analogue of PETS' TS-inf) and the returned obs, reward
        and terminated_prob are the averages over those E trajectories.
        """
        C = context_obs.shape[1]
        action_n = self.normalizer.normalize("action", actions)
        current = context_obs[:, -1]
        preds, rewards, terms = [], [], []
        for t in range(C - 1, actions.shape[1]):
            next_obs, reward, term = self._step(current, action_n[:, t])
            current = next_obs.mean(0) if self.propagation == "mean" else next_obs
            preds.append(next_obs.mean(0)), rewards.append(reward.mean(0)), terms.append(term.mean(0))
        stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        return {"obs": stack(preds), "reward": stack(rewards), "terminated_prob": stack(terms)}

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor | None = None) -> dict:
        """Ensemble means, for any leading dims obs [..., D], action [..., A]: each step is predicted from its own obs
        alone, so `first` changes nothing."""
        lead = obs.shape[:-1]
        next_obs, reward, term = self._step(
            obs.reshape(-1, self.obs_dim), self.normalizer.normalize("action", action).reshape(-1, self.action_dim)
        )
        return {
            "next_obs": next_obs.mean(0).reshape(*lead, -1),
            "reward": reward.mean(0).reshape(lead),
            "terminated_prob": term.mean(0).reshape(lead),
        }
