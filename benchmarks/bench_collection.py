"""Row 2: collection on CartPole-v1, env steps per second including the writes into the replay buffer.

Ours: `make_env(num_envs=N)` (gymnasium's batched CartPole) driven by VectorCollector into a ReplayBuffer with one
stream per env, random policy, both as a prefill collects (large blocks per call) and as the trainer collects between
updates (one vector step per call, where the per-call overhead is not shared out). Baseline: the seed notebook's
one-env loop with a per-step `add`.

    python benchmarks/bench_collection.py [--quick]
"""

from __future__ import annotations

import time

import gymnasium as gym

from common import Row
from seed_baseline import SeedReplayBuffer, seed_collect
from worldmodel import RandomPolicy, ReplayBuffer, env_spec, make_env
from worldmodel.vector import VectorCollector


def ours_steps_per_s(num_envs: int, steps: int, per_call: int) -> float:
    """Env steps stored per second, collecting `per_call` env steps per call: a prefill's block, or num_envs (one
    vector step) as the trainer calls it between updates with env.num_envs envs."""
    env = make_env("CartPole-v1", seed=0, num_envs=num_envs)
    spec = env_spec(env)
    buffer = ReplayBuffer(steps + num_envs, spec.obs_dim, spec.action_dim, streams=num_envs, seed=0)
    collector = VectorCollector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec)
    collector.collect(num_envs * 10)  # first reset and warm-up, not timed
    buffer.clear()
    start = time.perf_counter()
    stored = 0
    for _ in range(steps // per_call):
        stored += collector.collect(per_call).steps
    elapsed = time.perf_counter() - start
    assert len(buffer) == stored  # every reported step was written
    return stored / elapsed


def env_only_steps_per_s(num_envs: int, steps: int) -> float:
    """gymnasium's vector env stepped with one fixed action, nothing stored: the ceiling for any collector."""
    env = make_env("CartPole-v1", seed=0, num_envs=num_envs)
    env.reset(seed=0)
    action = env.action_space.sample()
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        env.step(action)
    return steps / (time.perf_counter() - start)


def seed_steps_per_s(steps: int) -> float:
    env = gym.make("CartPole-v1")
    buffer = SeedReplayBuffer(steps, (4,), ())
    seed_collect(env, buffer, 1000)  # warm-up
    start = time.perf_counter()
    seed_collect(env, buffer, steps)
    return steps / (time.perf_counter() - start)


def rows(quick: bool = False, device: str = "cpu") -> list[Row]:
    steps = 100_000 if quick else 1_000_000
    baseline = max(seed_steps_per_s(steps // 10) for _ in range(2 if quick else 3))
    out = []
    for num_envs in (16, 64):
        ceiling = max(env_only_steps_per_s(num_envs, steps) for _ in range(2 if quick else 3))
        for per_call, how in ((steps // 10, f"{steps // 10:,} env steps per call (a prefill)"),
                              (num_envs, "one vector step per call (between updates)")):  # fmt: skip
            total = steps if per_call > num_envs else steps // 10
            ours = max(ours_steps_per_s(num_envs, total, per_call) for _ in range(2 if quick else 3))
            out.append(Row("collection", f"CartPole-v1, {num_envs} envs, random policy, buffer writes included, {how}",
                           ours, baseline, "seed one-env loop", "steps/s", True,
                           {"env alone": f"{ceiling:,.0f} steps/s", "ours / env alone": f"{ours / ceiling:.0%}"}))
    return out


if __name__ == "__main__":
    from run import main

    main(only=["collection"])
