"""make_env: a seeded gymnasium env, plus the shapes the rest of the pipeline needs from it."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from worldmodel.errors import ConfigError


@dataclass(frozen=True)
class EnvSpec:
    """What the buffer and model need to know about an env: flat observation and action vector widths.

    Discrete actions are stored and fed to the model as one-hot vectors (an integer index would tell the model that
    action 2 is "between" 1 and 3); Box actions are flattened vectors.
    """

    id: str
    obs_dim: int
    action_dim: int
    discrete: bool

    def encode_action(self, action: Any) -> np.ndarray:
        if self.discrete:
            one_hot = np.zeros(self.action_dim, dtype=np.float32)
            one_hot[int(action)] = 1.0
            return one_hot
        return np.asarray(action, dtype=np.float32).reshape(self.action_dim)


def check_env_id(env_id: str) -> None:
    """Fails fast, before anything is built, if `env.id` is not a registered gymnasium id.

    Custom envs use gymnasium's "module:EnvId" form: the module is imported first, and registers EnvId.
    """
    env_id = str(env_id)
    if ":" in env_id:
        module, env_id = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(
                "env.id", f"{module}:{env_id}", f"an importable module before the colon that registers {env_id} ({err})"
            ) from None
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        close = difflib.get_close_matches(str(env_id), list(gym.registry), n=3, cutoff=0.6)
        hint = f"Did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            "env.id",
            env_id,
            f"a registered gymnasium id such as CartPole-v1 or Pendulum-v1 ({err}). {hint}"
            "The env configs under conf/env/ list tested ones; `python -c \"import gymnasium; "
            "gymnasium.pprint_registry()\"` lists all",
        ) from None


def env_spec(env: gym.Env) -> EnvSpec:
    """Reads observation/action widths, refusing spaces the world model cannot consume."""
    env_id = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
    obs_space, act_space = env.observation_space, env.action_space
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError(
            "env.id", env_id, f"an env with Box (vector) observations; this one has {obs_space}"
        )
    if isinstance(act_space, gym.spaces.Discrete):
        return EnvSpec(env_id, int(np.prod(obs_space.shape)), int(act_space.n), discrete=True)
    if isinstance(act_space, gym.spaces.Box):
        return EnvSpec(env_id, int(np.prod(obs_space.shape)), int(np.prod(act_space.shape)), discrete=False)
    raise ConfigError("env.id", env_id, f"an env with Discrete or Box actions; this one has {act_space}")


def make_env(id: str, seed: int, max_episode_steps: int | None = None, kwargs: dict | None = None) -> gym.Env:
    """Builds `id` with its action space seeded, so random policies are reproducible.

    The observation stream is seeded by the collector's first `reset(seed=...)`, the gymnasium>=1.0 way.
    """
    check_env_id(id)
    env = gym.make(id, max_episode_steps=max_episode_steps, **dict(kwargs or {}))
    env.action_space.seed(seed)
    env_spec(env)  # refuse unsupported spaces now, not at the first sample
    return env
