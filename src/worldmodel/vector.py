"""Vectorized collection: N envs stepped together through gymnasium's vector API (`env.num_envs=N`).

Each env writes its own stream of the replay buffer, so a sampled sequence never mixes two envs.

gymnasium >= 1.0 vector envs autoreset in NEXT_STEP mode: the step that returns terminated/truncated for env k
carries its true final observation, and env k's *next* step ignores the action and only resets. That reset step
is not a transition, so it is never stored (its `valid` flag is False). The transition before it keeps the
final observation as its target, as in the single-env Collector.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from worldmodel.env import EnvSpec, env_spec
from worldmodel.replay import ReplayBuffer
from worldmodel.rollout import Collector, CollectStats, Policy, env_and_policy_state, load_env_and_policy


class VectorCollector:
    """Owns N envs' episodes in progress across calls, so collection can be interleaved with training.

    `collect(n)` asks for n env steps: it runs whole vector steps (N env steps each) and carries any remainder to the
    next call, so `trainer.env_steps_per_update` keeps its meaning whatever num_envs is.
    """

    def __init__(self, env: gym.vector.VectorEnv, buffer: ReplayBuffer, policy: Policy, seed: int,
                 spec: EnvSpec | None = None):  # fmt: skip
        mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if mode != AutoresetMode.NEXT_STEP:
            raise ValueError(f"VectorCollector handles NEXT_STEP autoreset only; {env} uses {mode}")
        if buffer.streams != env.num_envs:
            raise ValueError(f"the buffer has {buffer.streams} streams for {env.num_envs} envs; give it one per env")
        self.env, self.buffer, self.policy = env, buffer, policy
        self.spec = spec or env_spec(env)
        self.num_envs = env.num_envs
        self._seed: int | None = seed  # used by the first reset only
        self._run_seed = seed
        self._obs: np.ndarray | None = None
        self._resetting = np.zeros(self.num_envs, dtype=bool)  # env k's next step is an autoreset, not a transition
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._credit = 0  # env steps asked for but not yet run (less than one vector step)
        self.total_steps = 0  # transitions stored: the seed of a replaced env's reset follows from it (rollout.py)
        self.env_steps = 0  # env steps run, autoreset steps included
        self._eye = np.eye(self.spec.action_dim, dtype=np.float32)

    def collect(self, n_steps: int) -> CollectStats:
        self._credit += int(n_steps)
        steps, self._credit = divmod(self._credit, self.num_envs)
        stats = CollectStats()
        if steps == 0:
            return stats
        if self._obs is None:
            obs, _ = self.env.reset(seed=reset_seed(self.env, self._seed))
            self._seed = None
            self._obs = self._flat(obs)
        n, d, a = self.num_envs, self.spec.obs_dim, self.spec.action_dim
        # Preallocated for the whole call and written to the buffer at once: at 64 envs every numpy call in the loop
        # costs about as much as the env's own step, so the loop only stores what the env returns. obs[t] is what
        # step t-1 returned, so one [steps + 1] array holds both obs and next_obs.
        seen = np.empty((steps + 1, n, d), np.float32)
        if self.spec.discrete:
            actions = np.empty((steps, n), np.int64)
        else:
            # In the action space's own dtype: an integer Box env must get the integers a single env would (float32
            # ones fail its action_space.contains, or index with floats); the buffer stores them as float32 below.
            actions = np.empty((steps, *self.env.action_space.shape), self.env.action_space.dtype)
        reward = np.empty((steps, n), np.float32)
        terminated = np.empty((steps, n), bool)
        truncated = np.empty((steps, n), bool)
        seen[0] = self._obs
        blind = hasattr(self.policy, "actions")  # a policy that ignores observations: one draw for the whole call
        if blind:
            actions[:] = self.policy.actions(steps).reshape(actions.shape)
        for t in range(steps):
            if not blind:
                actions[t] = self.policy(seen[t])
            next_obs, reward[t], terminated[t], truncated[t], _ = self.env.step(actions[t])
            seen[t + 1] = next_obs.reshape(n, d)
        self._obs = seen[-1].copy()
        # NEXT_STEP autoreset: the step after env k's episode ends is its reset step (not a transition), and a reset
        # step itself never reports terminated/truncated, so "valid" is simply "the previous step did not end".
        done = terminated | truncated
        valid = np.concatenate([~self._resetting[None], ~done[:-1]])
        if (done & ~valid).any():
            raise RuntimeError(f"{self.env} reported an episode end on an autoreset step; VectorCollector relies on "
                               "gymnasium's NEXT_STEP contract that reset steps have terminated = truncated = False")
        self._resetting = done[-1].copy()
        stored = self._eye[actions] if self.spec.discrete else actions.astype(np.float32, copy=False)
        block = {
            "obs": seen[:-1],
            "action": stored.reshape(steps, n, a),
            "reward": reward,
            "next_obs": seen[1:],
            "terminated": terminated,
            "truncated": truncated,
        }
        self.buffer.extend_streams(valid, **block)
        stats.steps, stats.env_steps = int(valid.sum()), steps * n
        self.total_steps += stats.steps
        self.env_steps += stats.env_steps
        self._episode_stats(reward, valid, done, stats)  # done implies valid (checked above)
        return stats

    def _episode_stats(self, reward: np.ndarray, valid: np.ndarray, ends: np.ndarray, stats: CollectStats) -> None:
        """Returns and lengths of the episodes that ended in this block, continuing those in progress."""
        stepped = np.where(valid, reward.astype(np.float64), 0.0)  # summed in float64, as the single-env Collector does
        if not ends.any():  # most single vector steps: only the running totals move
            self._returns += stepped.sum(axis=0)
            self._lengths += valid.sum(axis=0)
            return
        returns = self._returns + np.cumsum(stepped, axis=0)  # [T, N] running, per env
        lengths = self._lengths + np.cumsum(valid, axis=0)
        self._returns[:], self._lengths[:] = returns[-1], lengths[-1]
        # Only the envs whose episodes ended, each cut where its episodes ended: a few numbers per vector step, which
        # plain Python handles faster than numpy calls on one-element arrays.
        for k in np.flatnonzero(ends.any(axis=0)).tolist():
            cut_r, cut_l = 0.0, 0
            for t in np.flatnonzero(ends[:, k]).tolist():
                r, n = float(returns[t, k]), int(lengths[t, k])
                stats.episode_returns.append(r - cut_r)
                stats.episode_lengths.append(n - cut_l)
                cut_r, cut_l = r, n
            self._returns[k], self._lengths[k] = returns[-1, k] - cut_r, lengths[-1, k] - cut_l

    def state_dict(self) -> dict:
        """The episodes in progress, the vector env itself and the policy's RNG, so collection continues exactly (see
        env_and_policy_state for an env that cannot be saved)."""
        return {
            **env_and_policy_state(self.env, self.policy),
            "obs": None if self._obs is None else self._obs.tolist(),
            "resetting": self._resetting.tolist(),
            "returns": self._returns.tolist(),
            "lengths": self._lengths.tolist(),
            "credit": self._credit,
            "total_steps": self.total_steps,
            "env_steps": self.env_steps,
            "seed": self._seed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.total_steps, self._credit = state["total_steps"], state["credit"]
        self.env_steps = state.get("env_steps", self.total_steps)  # checkpoints before it counted stored steps only
        env, self._seed = load_env_and_policy(state, self.policy, self._run_seed)
        if env is not None:
            self.env = env
            self._obs = None if state["obs"] is None else np.asarray(state["obs"], dtype=np.float32)
            self._resetting = np.asarray(state["resetting"], dtype=bool)
            self._returns = np.asarray(state["returns"], dtype=np.float64)
            self._lengths = np.asarray(state["lengths"], dtype=np.int64)
        elif state["obs"] is not None:
            # The envs could not be saved, so their episodes cannot continue: end each stream's open episode as a
            # truncation (consecutive rows stay consecutive steps) and start fresh episodes.
            newest = self.buffer.newest_rows()
            rows = self.buffer[newest]
            open_ = newest[~(rows["terminated"] | rows["truncated"])]
            if len(open_):
                self.buffer.update(open_, truncated=True)
            self._obs = None
            self._resetting[:] = False
            self._returns[:], self._lengths[:] = 0.0, 0

    def _flat(self, obs) -> np.ndarray:
        return np.asarray(obs, dtype=np.float32).reshape(self.num_envs, -1)


def make_collector(env, buffer: ReplayBuffer, policy: Policy, seed: int, spec: EnvSpec | None = None):
    """The collector for `env`: a VectorCollector for a vector env, else the single-env Collector."""
    if isinstance(env, gym.vector.VectorEnv):
        return VectorCollector(env, buffer, policy, seed=seed, spec=spec)
    return Collector(env, buffer, policy, seed=seed, spec=spec)


def reset_seed(env: gym.vector.VectorEnv, seed: int | None) -> int | list[int] | None:
    """The seed of a vector env's first reset. gymnasium seeds env k of a sync or async vector with seed + k, so in a
    sweep over seed=0,1,2 env k of one run would repeat env k+1 of the run before it, episode for episode: the runs
    would not be independent replicates. Each env gets a seed of its own from numpy's SeedSequence spawning instead. A
    batched env (CartPole's vector_entry_point) draws every env's states from one generator: it keeps the int."""
    if seed is None or not isinstance(env.unwrapped, gym.vector.SyncVectorEnv | gym.vector.AsyncVectorEnv):
        return seed
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(int(seed)).spawn(env.num_envs)]
