"""Rollout: drive a policy in an env (obs -> action -> reward -> next obs) and write every transition to a buffer."""

from __future__ import annotations

import copy
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from worldmodel.env import EnvSpec, env_spec
from worldmodel.replay import ReplayBuffer

log = logging.getLogger(__name__)


class Policy(Protocol):
    """The seam for anything that acts: random now, a planner over the world model later.

    A policy that ignores observations may also offer `actions(steps)`: its next `steps` actions at once, stacked,
    the same values as `steps` calls. VectorCollector then draws a whole call's actions up front (see there).
    """

    def __call__(self, obs: np.ndarray) -> Any: ...


class RandomPolicy:
    """Uniform actions from its own seeded copy of the env's action space, so its random stream is part of its
    state (saved and restored on resume) rather than the env's."""

    def __init__(self, action_space: gym.Space, seed: int):
        self.action_space = copy.deepcopy(action_space)
        self.action_space.seed(int(seed))

    def __call__(self, obs: np.ndarray) -> Any:
        return self.action_space.sample()

    def actions(self, steps: int) -> np.ndarray:
        """`steps` actions stacked, bit for bit the values `steps` calls would return, leaving the RNG where they
        would. For a vector env's MultiDiscrete space and a bounded float Box, numpy fills one block in the order that
        single draws consume the stream, so one draw replaces `steps` (at 16 CartPole envs the per-step draws cost
        ~6% of collection); any other space, and a subclass with its own __call__ (its draws are not these), draws one
        step at a time."""
        space, rng = self.action_space, self.action_space.np_random
        uniform = type(self).__call__ is RandomPolicy.__call__
        if uniform and type(space) is gym.spaces.MultiDiscrete:
            return (rng.random((steps, *space.nvec.shape)) * space.nvec).astype(space.dtype) + space.start
        if uniform and type(space) is gym.spaces.Box and space.dtype.kind == "f" and space.is_bounded("both"):
            low, high = space.low.reshape(-1), space.high.reshape(-1)
            block = rng.uniform(low=low, high=high, size=(steps, low.size))
            return block.astype(space.dtype).reshape(steps, *space.shape)
        return np.stack([self(None) for _ in range(steps)])

    def state_dict(self) -> dict:
        return {"rng": self.action_space.np_random.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.action_space.np_random.bit_generator.state = state["rng"]


class StickyRandomPolicy(RandomPolicy):
    """Repeats its previous action with probability `repeat_prob`, else draws a new uniform one.

    Held actions drive an env much further from its resting states than uniform noise does (a pendulum swings up, a
    cart runs away), so data gathered this way tests a model outside the random policy's distribution.
    """

    def __init__(self, action_space: gym.Space, seed: int, repeat_prob: float = 0.9):
        super().__init__(action_space, seed)
        self.repeat_prob = float(repeat_prob)
        self._last: Any = None

    def __call__(self, obs: np.ndarray) -> Any:
        if self._last is None or self.action_space.np_random.random() >= self.repeat_prob:
            self._last = self.action_space.sample()
        return self._last

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last": None if self._last is None else np.asarray(self._last).tolist()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._last = None if state["last"] is None else self._as_action(state["last"])

    def _as_action(self, value):
        if isinstance(self.action_space, gym.spaces.Discrete):
            return int(value)
        return np.asarray(value, dtype=self.action_space.dtype)


#: scripts/collect.py's `policy` options.
POLICIES = {"random": RandomPolicy, "sticky": StickyRandomPolicy}

_UNPICKLABLE: set[type] = set()  # env types already warned about, so each run says it once, not at every checkpoint


def env_and_policy_state(env, policy: Policy) -> dict:
    """What both collectors save of the env and the policy: the env object pickled and the policy's RNG state.

    gymnasium has no generic get/set-state API; pickling the env object restores the classic-control envs exactly
    (physics state, time-limit counter and RNG). An env that cannot be pickled (a simulator, an async vector env's
    subprocesses) is saved as None, and the collector's load_state_dict cuts the episodes in progress instead.
    """
    try:
        env_blob = pickle.dumps(env)
    except Exception as err:
        env_blob = None
        if type(env) not in _UNPICKLABLE:
            _UNPICKLABLE.add(type(env))
            log.warning("%s cannot be pickled (%s: %s): a run resumed from this checkpoint cuts its episodes in "
                        "progress and is not bit-identical to one that never stopped", type(env).__name__,
                        type(err).__name__, err)  # fmt: skip
    return {"env": env_blob, "policy": policy.state_dict() if hasattr(policy, "state_dict") else None}


def load_env_and_policy(state: dict, policy: Policy, run_seed: int) -> tuple[Any, int | None]:
    """Restores the policy's RNG from a collector's state (env_and_policy_state and its own keys "seed" and
    "total_steps"). Returns the unpickled env, or None if none was saved, and the seed of the env's next reset: the
    saved one (None once the first reset is done), or for an env that replaces an unsaved one, fresh_env_seed."""
    if state["policy"] is not None:
        policy.load_state_dict(state["policy"])
    if state["env"] is not None:
        return pickle.loads(state["env"]), state["seed"]  # our own checkpoint, written by us
    return None, state["seed"] if state["seed"] is not None else fresh_env_seed(run_seed, state["total_steps"])


def fresh_env_seed(run_seed: int, total_steps: int) -> int:
    """The seed for the first reset of the env that replaces one a checkpoint could not save. A reset without a seed
    would draw entropy from the OS, and two resumes of the same checkpoint would collect different episodes; this one
    follows from the run's seed and the steps collected before the checkpoint, so it is the same for every resume of
    that checkpoint and differs from the run's first reset."""
    return int(np.random.SeedSequence([int(run_seed), int(total_steps)]).generate_state(1)[0])


@dataclass
class CollectStats:
    steps: int = 0  # transitions stored
    env_steps: int = 0  # env steps run: a vector env's autoreset steps too, which store nothing
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)


class Collector:
    """Owns one env's episode in progress across calls, so collection can be interleaved with training.

    It never resets the env in the middle of an episode, which is what lets the buffer treat consecutive rows as
    consecutive steps. For N envs stepped together (`env.num_envs=N`) see VectorCollector in vector.py, which writes
    one replay stream per env through the same policy seam.
    """

    def __init__(self, env: gym.Env, buffer: ReplayBuffer, policy: Policy, seed: int, spec: EnvSpec | None = None):
        self.env, self.buffer, self.policy = env, buffer, policy
        self.spec = spec or env_spec(env)
        self._seed: int | None = seed  # used by the first reset only: later resets continue the env's own RNG
        self._run_seed = seed
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
        stats.env_steps = stats.steps
        self.total_steps += stats.steps
        return stats

    @property
    def env_steps(self) -> int:
        """Env steps run so far: one env stores each step it runs."""
        return self.total_steps

    def state_dict(self) -> dict:
        """The episode in progress, the env itself and the policy's RNG, so collection continues exactly (see
        env_and_policy_state for an env that cannot be saved)."""
        return {
            **env_and_policy_state(self.env, self.policy),
            "obs": None if self._obs is None else self._obs.tolist(),
            "episode_return": self._return,
            "episode_length": self._length,
            "total_steps": self.total_steps,
            "seed": self._seed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.total_steps = state["total_steps"]
        env, self._seed = load_env_and_policy(state, self.policy, self._run_seed)
        if env is not None:
            self.env = env
            self._obs = None if state["obs"] is None else np.asarray(state["obs"], dtype=np.float32)
            self._return, self._length = state["episode_return"], state["episode_length"]
        elif state["obs"] is not None and len(self.buffer):
            # The env could not be saved, so its episode cannot continue: end it as a truncation, which keeps the
            # buffer's rule that consecutive rows are consecutive steps, and start a fresh episode.
            self.buffer.update(-1, truncated=True)
            self._obs, self._return, self._length = None, 0.0, 0

    @staticmethod
    def _flat(obs) -> np.ndarray:
        return np.asarray(obs, dtype=np.float32).reshape(-1)
