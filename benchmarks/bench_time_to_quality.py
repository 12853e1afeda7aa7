"""Row 4: time to quality. Wall-clock seconds (collection, prefill and updates; validation passes not counted) until
the one-step normalized MSE on held-out CartPole episodes is <= 1e-3.

Ours: the default config of scripts/train.py (conf/, composed through Hydra), driven the way Trainer.fit drives it.
Baseline: a seed-equivalent loop (the seed buffer, its one-env collection, its model and optimizer) whose only change
is that it predicts the next observation, so both do the same job. Both are scored the same way on the same windows:
the model sees 5 steps of an episode and predicts the observation after the 5th; nmse is the per-dimension MSE over
the variance of those targets, averaged over dimensions (as eval/nmse_h1).

    python benchmarks/bench_time_to_quality.py [--quick] [--device cuda]
"""

from __future__ import annotations

import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from common import Row
from seed_baseline import SeedReplayBuffer, SeedWorldModel, seed_update
from worldmodel import RandomPolicy, ReplayBuffer, env_spec
from worldmodel.evaluation import episode_window_starts
from worldmodel.rollout import Collector
from worldmodel.runtime import VAL_SEED_OFFSET, seed_everything

TARGET, CONTEXT = 1e-3, 5
CONF = Path(__file__).resolve().parents[1] / "conf"


def validation_windows(seed: int, steps: int = 2000):
    """Held-out random-policy CartPole windows of CONTEXT steps inside one episode, as one Batch."""
    env = gym.make("CartPole-v1")
    spec = env_spec(env)
    buffer = ReplayBuffer(steps, spec.obs_dim, spec.action_dim, seed=seed)
    Collector(env, buffer, RandomPolicy(env.action_space, seed), seed=seed, spec=spec).collect(steps)
    return buffer.gather(episode_window_starts(buffer, CONTEXT), CONTEXT)


def nmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((((pred - target) ** 2).mean(0) / target.var(0, correction=0)).mean())


def due(updates: int) -> bool:
    """Validate every 10 updates at first, then every 100: fine resolution early, little overhead later."""
    return updates % (10 if updates < 1000 else 100) == 0


class Clock:
    """Wall time of the training work only: paused while validating."""

    def __init__(self, budget_s: float):
        self.budget_s, self.spent, self._start = budget_s, 0.0, time.perf_counter()

    def pause(self) -> None:
        self.spent += time.perf_counter() - self._start

    def resume(self) -> None:
        self._start = time.perf_counter()

    @property
    def over(self) -> bool:
        return self.spent > self.budget_s


def ours(budget_s: float, device: str) -> tuple[float | None, int]:
    """(seconds to TARGET or None, updates done) for the default config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer.device={device}"])
    seed_everything(cfg.seed)
    val = validation_windows(cfg.seed + VAL_SEED_OFFSET).to(device)
    clock = Clock(budget_s)
    env = instantiate(cfg.env, seed=cfg.seed)
    spec = env_spec(env)
    dims = {"obs_dim": spec.obs_dim, "action_dim": spec.action_dim}
    buffer = instantiate(cfg.buffer, **dims, device=device, batch_device=device, seed=cfg.seed)
    model = instantiate(cfg.model, **dims)
    trainer = instantiate(cfg.trainer, device=device)
    collector = Collector(env, buffer, RandomPolicy(env.action_space, cfg.seed), seed=cfg.seed, spec=spec)
    collector.collect(trainer.prefill)
    stored = buffer[:]
    model.fit_normalizer(stored["obs"], stored["action"], stored["reward"], stored["next_obs"])
    model.to(device).train()
    _, update, sample = trainer.build_update(model, buffer)
    updates = 0
    while not clock.over:
        collector.collect(trainer.env_steps_per_update)
        update(sample(trainer.batch_size, trainer.seq_len))
        updates += 1
        if due(updates):
            clock.pause()
            with torch.no_grad():
                model.eval()
                pred = model.imagine(val.obs, val.action, val.first)["obs"][:, 0]
                model.train()
            if nmse(pred, val.next_obs[:, -1]) <= TARGET:
                return clock.spent, updates
            clock.resume()
    return None, updates


def seed(budget_s: float, device: str) -> tuple[float | None, int]:
    """The seed's loop with the same schedule as ours: 5000 prefill steps, then one env step per update."""
    seed_everything(0)
    np.random.seed(0)
    val = validation_windows(VAL_SEED_OFFSET).to(device)
    clock = Clock(budget_s)
    env = gym.make("CartPole-v1")
    buffer = SeedReplayBuffer(100_000, (4,), (2,))
    model = SeedWorldModel(4, 2, latent_dim=32).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    eye = np.eye(2, dtype=np.float32)
    obs, _ = env.reset(seed=0)

    def step():  # the seed's collection loop body (one-hot actions, so its model gets the same inputs as ours)
        nonlocal obs
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, eye[action], reward, terminated or truncated)
        obs = env.reset()[0] if terminated or truncated else next_obs

    for _ in range(5000):
        step()
    updates = 0
    while not clock.over:
        step()
        seed_update(model, optimizer, buffer, 32, 16, device, predict_next=True)
        updates += 1
        if due(updates):
            clock.pause()
            with torch.no_grad():
                pred = model(val.obs, val.action)[0][:, -1]
            if nmse(pred, val.next_obs[:, -1]) <= TARGET:
                return clock.spent, updates
            clock.resume()
    return None, updates


def rows(quick: bool = False, device: str = "cpu") -> list[Row]:
    budget = 60.0 if quick else 300.0
    t_ours, n_ours = ours(budget, device)
    t_seed, n_seed = seed(budget, device)
    notes = {"updates": f"ours {n_ours}, seed {n_seed}"}
    if t_seed is None:
        notes["seed"] = f"not reached in {budget:.0f} s: ratio is a lower bound"
    case = f"CartPole-v1, one-step nmse <= {TARGET:g}, {device}"
    if t_ours is None:
        notes["ours"] = f"not reached in {budget:.0f} s"
    return [Row("time-to-quality", case, t_ours or float("inf"), t_seed or budget, "seed-equivalent loop", "s", False,
                notes)]  # fmt: skip


if __name__ == "__main__":
    from run import main

    main(only=["time-to-quality"])
