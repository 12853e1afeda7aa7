"""RSSMWorldModel (model=rssm): a Dreamer-style recurrent state-space model for vector observations.

State s_t = (h_t, z_t): a deterministic GRU path h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]) and a stochastic latent z_t
with a prior p(z_t | h_t) and a posterior q(z_t | h_t, embed(obs_t)). The latent is a diagonal Gaussian (std =
softplus + min_std) rather than Dreamer's categorical: our observations are low-dimensional continuous vectors, the
KL is closed-form, and the prior *mean* is a meaningful, deterministic point to roll out from at evaluation time (the
mean of a categorical is a soft mixture the networks never saw in training).

Timing in our row convention (row t holds obs_t, action_t and the env's answer next_obs_t, reward_t, terminated_t):
row t filters obs_t into z_t, takes action_t to h_{t+1} = GRU(h_t, [z_t, a_t]), and predicts the row's answer from
(h_{t+1}, mean of p(z_{t+1} | h_{t+1})), i.e. from obs_0..obs_t and a_0..a_t only, never from next_obs_t. The decoder
reconstructs obs_t from (h_t, z_t) and the KL ties q(z_t | h_t, obs_t) to p(z_t | h_t), so the prior learns to
predict what the next observation will add. Where `first` is set, h is reset to zeros before filtering (and the
z_{t-1}, a_{t-1} of the old episode are never read). Training samples z from the posterior; in eval mode (validation)
and in `imagine` every latent is its mean, so those are deterministic and draw nothing from the global RNG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.models.base import WorldModel, mlp, one_episode_each


def gaussian_kl(mean_q, std_q, mean_p, std_p) -> torch.Tensor:
    """KL(q || p) of diagonal Gaussians, summed over the last dimension."""
    var_ratio = (std_q / std_p) ** 2
    return 0.5 * (var_ratio + ((mean_q - mean_p) / std_p) ** 2 - 1.0 - var_ratio.log()).sum(-1)


class RSSMWorldModel(WorldModel):
    loss_terms = ("obs", "reward", "terminated", "recon", "kl")

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        latent_dim: int = 64,
        stoch_dim: int = 16,
        hidden_dim: int = 128,
        min_std: float = 0.1,
        free_nats: float = 3.0,
        kl_balance: float = 0.8,
        kl_coef: float = 0.1,
        recon_coef: float = 1.0,
        reward_coef: float = 1.0,
        terminated_coef: float = 1.0,
    ):
        super().__init__(obs_dim, action_dim)
        self.latent_dim, self.stoch_dim, self.min_std = int(latent_dim), int(stoch_dim), float(min_std)
        self.free_nats, self.kl_balance, self.kl_coef = float(free_nats), float(kl_balance), float(kl_coef)
        self.recon_coef, self.reward_coef, self.terminated_coef = recon_coef, reward_coef, terminated_coef
        self.encoder = mlp(obs_dim, hidden_dim, hidden_dim)
        self.img_in = nn.Sequential(nn.Linear(stoch_dim + action_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU())
        self.rnn = nn.GRUCell(hidden_dim, latent_dim)
        self.prior_net = mlp(latent_dim, hidden_dim, 2 * stoch_dim)
        self.posterior_net = mlp(latent_dim + hidden_dim, hidden_dim, 2 * stoch_dim)
        feat = latent_dim + stoch_dim
        self.decoder = mlp(feat, hidden_dim, obs_dim)
        self.next_obs_head = mlp(feat, hidden_dim, obs_dim)
        self.reward_head = mlp(feat, hidden_dim, 1)
        self.terminated_head = mlp(feat, hidden_dim, 1)

    def _stats(self, net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = net(x).chunk(2, dim=-1)
        return mean, F.softplus(raw) + self.min_std

    def _filter(self, obs_n, action_n, first, sample: bool):
        """Posterior pass over normalized obs/action [B, T, .]; returns per-row h_t, (mean, std) of q(z_t), z_t and
        h_{t+1} (the deterministic state after action_t)."""
        embed = self.encoder(obs_n)
        keep = (~first.bool()).unsqueeze(-1).to(obs_n.dtype)
        h = obs_n.new_zeros(obs_n.shape[0], self.latent_dim)
        hs, means, stds, zs, h_next = [], [], [], [], []
        for t in range(obs_n.shape[1]):
            h = h * keep[:, t]
            mean, std = self._stats(self.posterior_net, torch.cat([h, embed[:, t]], -1))
            z = mean + std * torch.randn_like(std) if sample else mean
            hs.append(h), means.append(mean), stds.append(std), zs.append(z)
            h = self.rnn(self.img_in(torch.cat([z, action_n[:, t]], -1)), h)
            h_next.append(h)
        stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        return stack(hs), (stack(means), stack(stds)), stack(zs), stack(h_next)

    def _heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized predictions of a row's answer from the state after its action: h and the prior mean of z."""
        # The prior is trained by the KL alone (stop-gradient here), as in Dreamer: it stays an estimate of the
        # posterior, which is what the transition consumes when `imagine` rolls forward on prior means.
        feat = torch.cat([h, self._stats(self.prior_net, h)[0].detach()], dim=-1)
        return {
            "delta": self.next_obs_head(feat),
            "reward": self.reward_head(feat).squeeze(-1),
            "terminated_logit": self.terminated_head(feat).squeeze(-1),
        }

    def forward(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced: obs [B, T, D], action [B, T, A], first [B, T] -> normalized predictions per row (plus the
        reconstruction and the per-row KL pieces the loss needs). Samples z only in training mode."""
        norm = self.normalizer
        obs_n, action_n = norm.normalize("obs", obs), norm.normalize("action", action)
        h, (post_mean, post_std), z, h_next = self._filter(obs_n, action_n, first, sample=self.training)
        prior_mean, prior_std = self._stats(self.prior_net, h)
        return {
            **self._heads(h_next),
            "recon": self.decoder(torch.cat([h, z], dim=-1)),
            "post": (post_mean, post_std),
            "prior": (prior_mean, prior_std),
        }

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_fitted()
        norm = self.normalizer
        out = self(batch.obs, batch.action, batch.first)
        # In fp32 under bf16 autocast too, as autocast keeps losses: the KL is a small difference of terms near 1
        # (var_ratio - 1 - log var_ratio), and train/kl would otherwise be a bf16 value (1/64 nat steps near 3).
        (qm, qs), (pm, ps) = [t.float() for t in out["post"]], [t.float() for t in out["prior"]]
        # KL balancing: mostly train the prior toward the posterior, less the posterior toward the prior. Free nats
        # per row (clamped after balancing, so both sides stop together) keep the latent from collapsing to the prior.
        kl = self.kl_balance * gaussian_kl(qm.detach(), qs.detach(), pm, ps) + (
            1.0 - self.kl_balance
        ) * gaussian_kl(qm, qs, pm.detach(), ps.detach())
        terms = {
            **self._transition_terms(out, batch),
            "recon": F.mse_loss(out["recon"], norm.normalize("obs", batch.obs)),
            "kl": kl.mean(),  # logged as train/kl: the KL itself, whether or not the free nats hide it from the loss
        }
        total = (
            terms["obs"]
            + self.reward_coef * terms["reward"]
            + self.terminated_coef * terms["terminated"]
            + self.recon_coef * terms["recon"]
            + self.kl_coef * kl.clamp_min(self.free_nats).mean()
        )
        return total, terms

    def imagine(
        self, context_obs: torch.Tensor, actions: torch.Tensor, first: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Filter context_obs [B, C, D] with the posterior mean, then roll the latent forward on the prior mean with
        actions[:, C:]. Returns H = actions.shape[1] - C + 1 predictions in env units (see models/base.py)."""
        norm = self.normalizer
        B, C = context_obs.shape[:2]
        if first is None:
            first = torch.zeros(B, C, dtype=torch.bool, device=context_obs.device)
        first = first.bool().clone()
        first[:, 0] = True
        action_n = norm.normalize("action", actions)
        _, _, _, h_next = self._filter(norm.normalize("obs", context_obs), action_n[:, :C], first, sample=False)
        h, current = h_next[:, -1], context_obs[:, -1]
        preds, rewards, terms = [], [], []
        for t in range(C, actions.shape[1] + 1):
            out = self._heads(h)
            current = current + norm.denormalize("delta", out["delta"])
            preds.append(current)
            rewards.append(norm.denormalize("reward", out["reward"].unsqueeze(-1)).squeeze(-1))
            terms.append(torch.sigmoid(out["terminated_logit"]))
            if t < actions.shape[1]:
                z = self._stats(self.prior_net, h)[0]
                h = self.rnn(self.img_in(torch.cat([z, action_n[:, t]], -1)), h)
        stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        return {"obs": stack(preds), "reward": stack(rewards), "terminated_prob": stack(terms)}

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor | None = None) -> dict:
        """(The latents at their means.)"""
        norm = self.normalizer
        first = one_episode_each(obs) if first is None else first
        h_next = self._filter(norm.normalize("obs", obs), norm.normalize("action", action), first, sample=False)[3]
        return self._in_env_units(obs, self._heads(h_next))
