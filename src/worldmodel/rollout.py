"""Rollout: drive a policy in an env (obs -> action -> reward -> next obs) and write every transition to a buffer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from worldmodel.env import EnvSpec, env_spec
from worldmodel.replay import ReplayBuffer


class Policy(Protocol):
    """The seam for anything that acts: random now, a planner over the world model later."""

    def __call__(self, obs: np.ndarray) -> Any: ...


class RandomPolicy:
    """Uniform actions from the env's (seeded) action space."""

    def __init__(self, action_space: gym.Space):
        self.action_space = action_space

    def __call__(self, obs: np.ndarray) -> Any:
        return self.action_space.sample()


@dataclass
class CollectStats:
    steps: int = 0
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)


class Collector:
    """Owns one env's episode in progress across calls, so collection can be interleaved with training.

    It never resets the env in the middle of an episode, which is what lets the buffer treat consecutive rows as
    consecutive steps. Several parallel envs are a later step (vectorized collection); the policy seam stays the same.
    """

    def __init__(self, env: gym.Env, buffer: ReplayBuffer, policy: Policy, seed: int, spec: EnvSpec | None = None):
        self.env, self.buffer, self.policy = env, buffer, policy
        self.spec = spec or env_spec(env)
        self._seed: int | None = seed  # used by the first reset only: later resets continue the env's own RNG
        self._obs: np.ndarray | None = None
        self._return, self._length = 0.0, 0
        self.total_steps = 0

    def collect(self, n_steps: int) -> CollectStats:
        stats = CollectStats()
        for _ in range(int(n_steps)):
            if self._obs is None:
                obs, _ = self.env.reset(seed=self._seed)
                self._seed = None
                self._obs = self._flat(obs)
            action = self.policy(self._obs)
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            next_obs = self._flat(next_obs)
            self.buffer.add(
                obs=self._obs,
                action=self.spec.encode_action(action),
                reward=float(reward),
                next_obs=next_obs,  # on the last step this is the true final observation, kept as a target
                terminated=bool(terminated),
                truncated=bool(truncated),
            )
            self._return += float(reward)
            self._length += 1
            stats.steps += 1
            if terminated or truncated:
                stats.episode_returns.append(self._return)
                stats.episode_lengths.append(self._length)
                self._obs, self._return, self._length = None, 0.0, 0
            else:
                self._obs = next_obs
        self.total_steps += stats.steps
        return stats

    @staticmethod
    def _flat(obs) -> np.ndarray:
        return np.asarray(obs, dtype=np.float32).reshape(-1)
