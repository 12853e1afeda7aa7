"""Vectorized collection: one replay stream per env, reset steps never stored, every stored row a real transition."""

from __future__ import annotations

import os
import pickle
import signal
import time

import gymnasium as gym
import numpy as np
import pytest

from worldmodel import ConfigError, RandomPolicy, ReplayBuffer, env_spec, make_env
from worldmodel.vector import VectorCollector, make_collector, reset_seed


def vector_collector(env_id: str, num_envs: int, seed: int = 0, **env_kwargs) -> VectorCollector:
    env = make_env(env_id, seed=seed, num_envs=num_envs, **env_kwargs)
    spec = env_spec(env)
    buffer = ReplayBuffer(100_000, spec.obs_dim, spec.action_dim, streams=num_envs, seed=seed)
    collector = make_collector(env, buffer, RandomPolicy(env.action_space, seed), seed=seed, spec=spec)
    assert isinstance(collector, VectorCollector)
    return collector


def vector_run(env_id: str, num_envs: int, steps: int, seed: int = 0, **env_kwargs):
    collector = vector_collector(env_id, num_envs, seed, **env_kwargs)
    stats = collector.collect(steps)
    return collector.buffer, collector.spec, stats


def stream_rows(buffer: ReplayBuffer) -> list[dict[str, np.ndarray]]:
    rows, begin = buffer[:], 0
    out = []
    for size in buffer.ring.sizes:
        out.append({k: v[begin : begin + size] for k, v in rows.items()})
        begin += size
    return out


@pytest.mark.parametrize(
    "env_id, num_envs, kwargs",
    [
        ("CartPole-v1", 4, {}),  # gymnasium's own batched CartPole (vector_entry_point)
        ("Pendulum-v1", 3, {"max_episode_steps": 7}),  # SyncVectorEnv, Box actions, many truncations
        ("CartPole-v1", 2, {"vectorization_mode": "sync"}),
    ],
)
def test_every_stored_row_is_the_transition_a_replay_of_the_env_returns(env_id, num_envs, kwargs):
    """Steps a second, identically seeded vector env by hand with the stored actions. An env whose previous step
    ended its episode is autoresetting: the action is ignored (we send any), and nothing may be stored for it.
    Every other env's step must be exactly the next stored row of that env's stream."""
    vector_steps = 60
    buffer, spec, stats = vector_run(env_id, num_envs, vector_steps * num_envs, **kwargs)
    streams = stream_rows(buffer)
    ends = assert_rows_replay_the_env(buffer, spec, env_id, num_envs, vector_steps, **kwargs)
    assert stats.steps == len(buffer) == vector_steps * num_envs - int(
        sum(1 for s in streams for d in (s["terminated"] | s["truncated"])[:-1] if d)
    )  # one reset step per episode end, except an end on the very last step
    assert ends >= 2 * num_envs  # many boundaries were crossed
    assert len(stats.episode_lengths) == ends
    # Within a stream, rows chain: each next_obs is the next row's obs unless the episode ended there.
    for s in streams:
        cont = ~(s["terminated"] | s["truncated"])[:-1]
        np.testing.assert_array_equal(s["next_obs"][:-1][cont], s["obs"][1:][cont])


def assert_rows_replay_the_env(buffer, spec, env_id: str, num_envs: int, vector_steps: int, seed: int = 0,
                               **kwargs) -> int:  # fmt: skip
    """Replays `vector_steps` of a fresh env seeded like the collector's with the stored actions and checks that the
    buffer holds exactly its transitions, none for an autoreset step; returns the number of episode ends."""
    streams = stream_rows(buffer)
    env = make_env(env_id, seed=seed, num_envs=num_envs, **kwargs)
    obs, _ = env.reset(seed=reset_seed(env, seed))  # the collector's first reset
    cursor = np.zeros(num_envs, dtype=int)
    resetting = np.zeros(num_envs, dtype=bool)
    ends = 0
    for _ in range(vector_steps):
        actions = []
        for k in range(num_envs):
            if resetting[k]:
                actions.append(env.single_action_space.sample())
            else:
                a = streams[k]["action"][cursor[k]]
                actions.append(int(np.argmax(a)) if spec.discrete else a.reshape(env.single_action_space.shape))
        next_obs, reward, terminated, truncated, _ = env.step(np.array(actions))
        for k in range(num_envs):
            if resetting[k]:
                continue
            row = {name: col[cursor[k]] for name, col in streams[k].items()}
            np.testing.assert_array_equal(row["obs"], np.asarray(obs[k], np.float32).reshape(-1))
            np.testing.assert_array_equal(row["next_obs"], np.asarray(next_obs[k], np.float32).reshape(-1))
            assert row["reward"] == np.float32(reward[k])
            assert (row["terminated"], row["truncated"]) == (terminated[k], truncated[k])
            cursor[k] += 1
        ends += int((~resetting & (terminated | truncated)).sum())
        resetting = ~resetting & (terminated | truncated)
        obs = next_obs
    assert (cursor == buffer.ring.sizes).all()  # nothing stored beyond the real transitions
    return ends


def test_collect_counts_env_steps_and_carries_the_remainder():
    env = make_env("CartPole-v1", seed=0, num_envs=4)
    spec = env_spec(env)
    buffer = ReplayBuffer(1000, spec.obs_dim, spec.action_dim, streams=4)
    collector = VectorCollector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec)
    assert collector.collect(3).steps == 0 and len(buffer) == 0  # less than one vector step: carried over
    assert collector.collect(1).steps == 4  # 3 + 1 = one vector step of 4 envs, nothing is reset yet
    assert collector.collect(9).steps > 0 and collector._credit == 1


def test_split_collection_equals_one_call_and_resume_continues_exactly():
    a, spec, _ = vector_run("CartPole-v1", 4, 400, seed=5)
    env = make_env("CartPole-v1", seed=5, num_envs=4)
    b = ReplayBuffer(100_000, spec.obs_dim, spec.action_dim, streams=4, seed=5)
    collector = VectorCollector(env, b, RandomPolicy(env.action_space, 5), seed=5, spec=spec)
    collector.collect(150)
    state, saved = collector.state_dict(), b.state_dict()
    # A fresh collector, restored from the saved state, finishes the job.
    env2 = make_env("CartPole-v1", seed=123, num_envs=4)
    c = ReplayBuffer(100_000, spec.obs_dim, spec.action_dim, streams=4)
    c.load_state_dict(saved)
    resumed = VectorCollector(env2, c, RandomPolicy(env2.action_space, 123), seed=123, spec=spec)
    resumed.load_state_dict(state)
    resumed.collect(250)
    for key, value in a[:].items():
        np.testing.assert_array_equal(c[:][key], value, err_msg=key)
    assert (c.ring.sizes == a.ring.sizes).all()


def test_unpicklable_env_on_resume_truncates_each_open_episode():
    _, spec, _ = vector_run("Pendulum-v1", 3, 30)
    env = make_env("Pendulum-v1", seed=0, num_envs=3)
    buffer = ReplayBuffer(1000, spec.obs_dim, spec.action_dim, streams=3)
    collector = VectorCollector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec)
    collector.collect(30)
    state = {**collector.state_dict(), "env": None}  # what an AsyncVectorEnv's state looks like
    collector.load_state_dict(state)
    for s in stream_rows(buffer):
        assert s["truncated"][-1]  # each stream's open episode is closed
        assert not s["truncated"][:-1].any()
    collector.collect(30)  # and collection starts fresh episodes
    assert len(buffer) == 60


@pytest.mark.parametrize("num_envs, episode_ends_at_checkpoint", [(1, False), (1, True), (3, False)])
def test_resuming_an_unsaved_env_twice_collects_the_same_rows(num_envs, episode_ends_at_checkpoint):
    """An env that a checkpoint cannot save (async vector envs) is replaced by a fresh one on resume. Its first reset
    must be seeded from the run, not from the OS: two resumes of one checkpoint collect the same episodes, and these
    are not the run's first episodes again."""

    def collector(buffer=None):
        env = make_env("Pendulum-v1", seed=0, num_envs=num_envs)
        spec = env_spec(env)
        buffer = buffer or ReplayBuffer(2000, spec.obs_dim, spec.action_dim, streams=num_envs)
        return make_collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec)

    run = collector()
    run.collect(200 * num_envs if episode_ends_at_checkpoint else 30 * num_envs)  # Pendulum: 200-step episodes
    assert (run._obs is None) == episode_ends_at_checkpoint
    state, saved = {**run.state_dict(), "env": None}, run.buffer.state_dict()
    resumed = []
    for _ in range(2):
        fresh = collector()
        fresh.buffer.load_state_dict(saved)
        fresh.load_state_dict(state)
        fresh.collect(20 * num_envs)
        resumed.append(np.stack([rows["obs"][-20:] for rows in stream_rows(fresh.buffer)]))  # each env's new rows
    np.testing.assert_array_equal(resumed[1], resumed[0])
    first = np.stack([rows["obs"][0] for rows in stream_rows(run.buffer)])  # each env's first reset in the run
    assert not (resumed[0][:, 0] == first).all(axis=-1).any()  # the fresh env's episodes are new ones


def test_vector_env_options_and_errors():
    env = make_env("CartPole-v1", seed=0, num_envs=3)
    assert type(env).__name__ == "CartPoleVectorEnv"  # the env's own batched version by default
    assert isinstance(make_env("CartPole-v1", seed=0, num_envs=2, vectorization_mode="sync"), gym.vector.SyncVectorEnv)
    assert not isinstance(make_env("CartPole-v1", seed=0), gym.vector.VectorEnv)
    spec = env_spec(env)
    assert (spec.obs_dim, spec.action_dim, spec.discrete) == (4, 2, True)
    with pytest.raises(ValueError, match="streams"):
        VectorCollector(env, ReplayBuffer(100, 4, 2, streams=2), RandomPolicy(env.action_space, 0), seed=0)
    with pytest.raises(ConfigError, match="env.vectorization_mode.*Pendulum-v1 has no batched implementation"):
        make_env("Pendulum-v1", seed=0, num_envs=2, vectorization_mode="vector_entry_point")


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_block_drawn_actions_store_what_per_step_calls_store(env_id):
    """RandomPolicy.actions lets VectorCollector draw a call's actions at once; a policy without it is asked step by
    step. Both must store the same rows, and leave the policy's RNG at the same point."""
    buffers, policies = [], []
    for blind in (True, False):
        env = make_env(env_id, seed=0, num_envs=3)
        spec = env_spec(env)
        buffer = ReplayBuffer(1000, spec.obs_dim, spec.action_dim, streams=3, seed=0)
        random_policy = RandomPolicy(env.action_space, 0)
        policy = random_policy if blind else (lambda obs, p=random_policy: p(obs))  # hides `actions`
        collector = VectorCollector(env, buffer, policy, seed=0, spec=spec)
        for n in (30, 45, 3):
            collector.collect(n)
        buffers.append(buffer[:])
        policies.append(random_policy)
    for name in buffers[0]:
        np.testing.assert_array_equal(buffers[0][name], buffers[1][name], err_msg=name)
    assert policies[0].state_dict() == policies[1].state_dict()


def test_a_prefill_left_short_by_autoreset_steps_is_topped_up_to_one_window():
    """4 CartPole envs, prefill 160 = num_envs x seq_len 40, the least config validation accepts: the autoreset steps
    store nothing, so no stream holds 40 transitions. The trainer collects on, a step of every env at a time, until
    one does, rather than failing at the first update after validation and logging have begun."""
    from worldmodel.trainer import Trainer

    env = make_env("CartPole-v1", seed=0, num_envs=4)
    spec = env_spec(env)
    buffer = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, streams=4, seed=0)
    collector = make_collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec)
    collector.collect(160)
    assert not buffer.can_sample(40)
    before = collector.total_steps
    Trainer(steps=1, prefill=160, batch_size=1, seq_len=40, lr=1e-3)._top_up(collector)
    assert buffer.can_sample(40) and not buffer.can_sample(41)  # one step of every env at a time, no more
    assert 0 < collector.total_steps - before <= 4 * 2 * 40
    buffer.sample(8, 40)


@pytest.mark.parametrize("env_id, num_envs", [("CartPole-v1", 1), ("CartPole-v1", 5), ("Pendulum-v1", 3)])
def test_episode_returns_and_lengths_are_those_of_the_stored_episodes(env_id, num_envs):
    """Over calls of every size (a vector step at a time, as between updates, and blocks), each finished episode is
    reported once, with its stored rows' length and summed reward, whichever calls it spanned (Pendulum: rewards
    that are not all 1, so a return cannot pass for a length)."""
    env = make_env(env_id, seed=3, num_envs=num_envs)
    spec = env_spec(env)
    buffer = ReplayBuffer(100_000, spec.obs_dim, spec.action_dim, streams=num_envs, seed=0)
    collector = make_collector(env, buffer, RandomPolicy(env.action_space, 3), seed=3, spec=spec)
    reported, expected = reported_and_stored_episodes(collector, [1, 7, 1, 40, 1, 1, 200, 3, 90] * 3, num_envs)
    assert len(expected) >= 5 * num_envs
    np.testing.assert_allclose(sorted(reported), sorted(expected), rtol=1e-9)  # float64 sums, in another order


def reported_and_stored_episodes(collector, calls: list[int], num_envs: int) -> tuple[list, list]:
    """(length, return) of each episode the collector reported over calls of `calls` vector steps each, and of each
    episode its buffer stored (from the rows' done flags and rewards)."""
    reported = []
    for steps in calls:
        stats = collector.collect(steps * num_envs)
        reported += list(zip(stats.episode_lengths, stats.episode_returns))
    expected = []
    for rows in stream_rows(collector.buffer):
        ends = np.flatnonzero(rows["terminated"] | rows["truncated"])
        starts = np.concatenate([[0], ends[:-1] + 1])
        expected += [(int(e - s + 1), float(rows["reward"][s : e + 1].astype(np.float64).sum()))
                     for s, e in zip(starts, ends)]  # fmt: skip
    return reported, expected


@pytest.mark.parametrize(
    "env_id, num_envs, kwargs",
    [
        ("CartPole-v1", 4, {}),
        ("Pendulum-v1", 3, {"max_episode_steps": 7}),  # every env's episode ends on the same vector step
        ("CartPole-v1", 2, {"vectorization_mode": "sync"}),
    ],
)
def test_rows_collected_over_many_small_calls_are_the_transitions_a_replay_of_the_env_returns(env_id, num_envs, kwargs):
    """Between updates the trainer collects a vector step at a time, so episodes often end on a call's last step:
    the next call must still know that env's first step is an autoreset and store nothing for it."""
    collector = vector_collector(env_id, num_envs, **kwargs)
    sizes = [num_envs] * 40 + [1, 2 * num_envs - 1, num_envs + 1, 3 * num_envs, num_envs - 1, 1] * 5 + [num_envs] * 20
    ends_at_call_end, stored, reported = 0, 0, 0
    for n in sizes:
        stats = collector.collect(n)
        stored += stats.steps
        reported += len(stats.episode_lengths)
        ends_at_call_end += int(collector._resetting.sum())
    vector_steps = sum(sizes) // num_envs
    assert collector._credit == sum(sizes) % num_envs
    buffer = collector.buffer
    ends = assert_rows_replay_the_env(buffer, collector.spec, env_id, num_envs, vector_steps, **kwargs)
    assert ends_at_call_end >= 3  # the case in question happened, several times
    assert stored == len(buffer) == collector.total_steps and reported == ends
    for s in stream_rows(buffer):  # no stored row leads from an episode's final observation to the next's reset
        ended = (s["terminated"] | s["truncated"])[:-1]
        assert not (s["obs"][1:][ended] == s["next_obs"][:-1][ended]).all(axis=-1).any()


def collect_until_an_episode_ends_on_a_calls_last_step(collector: VectorCollector, at_least: int = 10) -> None:
    """One vector step per call, at least `at_least` of them, until some (but not every) env's episode has just
    ended: its next step is an autoreset the collector must remember across calls (and checkpoints)."""
    for t in range(1000):
        collector.collect(collector.num_envs)
        if t + 1 >= at_least and collector._resetting.any() and not collector._resetting.all():
            return
    raise AssertionError("no episode ended on a call's last step")


def test_a_checkpoint_taken_just_after_an_episode_ended_resumes_bit_for_bit():
    """A checkpoint right after env k's episode ended (its next step an autoreset) resumes into a fresh collector,
    env and buffer that store exactly the rows, and report the episodes, of a run that never stopped."""
    run = vector_collector("CartPole-v1", 3, seed=2)
    collect_until_an_episode_ends_on_a_calls_last_step(run)
    state, saved = run.state_dict(), run.buffer.state_dict()
    expected = [run.collect(n) for n in (3, 3, 30, 3, 90)]

    resumed = vector_collector("CartPole-v1", 3, seed=99)  # another seed: everything must come from the checkpoint
    resumed.buffer.load_state_dict(saved)
    resumed.load_state_dict(state)
    got = [resumed.collect(n) for n in (3, 3, 30, 3, 90)]
    for key, value in run.buffer[:].items():
        np.testing.assert_array_equal(resumed.buffer[:][key], value, err_msg=key)
    assert (resumed.buffer.ring.sizes == run.buffer.ring.sizes).all()
    assert [(s.steps, s.episode_lengths, s.episode_returns) for s in got] == [
        (s.steps, s.episode_lengths, s.episode_returns) for s in expected
    ]
    assert resumed.total_steps == run.total_steps


def test_env_steps_count_every_env_step_run_autoreset_steps_included():
    """data/env_steps and perf/env_steps_per_s count what trainer.prefill and env_steps_per_update ask for: env steps
    run. An autoreset step stores no transition, so the stored count (total_steps) falls behind by one per episode."""
    run = vector_collector("CartPole-v1", 3, seed=4)
    stats = [run.collect(n) for n in (100, 2, 2, 2, 400)]  # 2 + 2 + 2: a vector step, carried credit, a vector step
    assert [s.env_steps for s in stats] == [99, 3, 0, 3, 399] and run.env_steps == 504
    ended = sum(len(s.episode_lengths) for s in stats)
    assert ended >= 3 and len(run.buffer) == run.total_steps == sum(s.steps for s in stats) < 504  # autoresets skipped
    old = {k: v for k, v in run.state_dict().items() if k != "env_steps"}  # a checkpoint from before the count
    resumed = vector_collector("CartPole-v1", 3, seed=4)
    resumed.load_state_dict(run.state_dict())
    assert resumed.env_steps == 504
    resumed.load_state_dict(old)
    assert resumed.env_steps == run.total_steps


def test_an_unsaved_env_resumed_just_after_an_episode_ended_stores_every_fresh_first_step():
    """Resuming without the env (an async vector env) restarts every env with a fresh, run-seeded reset; an env
    whose episode had just ended must not skip that fresh episode's first transition as if it were an autoreset."""
    from worldmodel.rollout import fresh_env_seed

    run = vector_collector("CartPole-v1", 3, seed=1)
    collect_until_an_episode_ends_on_a_calls_last_step(run)
    before = run.buffer.ring.sizes.copy()
    run.load_state_dict({**run.state_dict(), "env": None})
    for s in stream_rows(run.buffer):
        assert s["terminated"][-1] or s["truncated"][-1]  # every stream's episode is closed
    stats = run.collect(3)
    assert stats.steps == 3 and (run.buffer.ring.sizes == before + 1).all()  # one transition of every env
    reset, _ = make_env("CartPole-v1", seed=0, num_envs=3).reset(seed=fresh_env_seed(1, run.total_steps - 3))
    first = np.stack([s["obs"][-1] for s in stream_rows(run.buffer)])
    np.testing.assert_array_equal(first, np.asarray(reset, np.float32))  # the fresh episodes' first observations


def test_an_unsaved_env_resumed_just_after_a_termination_keeps_it_a_termination_only():
    """Resuming without the env closes each stream's open episode as a truncation, and only the open ones: a stream
    whose newest row is a real termination must not also get truncated=True, which would tell the model (and every
    window sampled there) that the episode was cut by a time limit rather than ended by the env."""
    run = vector_collector("CartPole-v1", 3, seed=1)
    collect_until_an_episode_ends_on_a_calls_last_step(run)
    newest = [(bool(s["terminated"][-1]), bool(s["truncated"][-1])) for s in stream_rows(run.buffer)]
    assert (True, False) in newest and (False, False) in newest  # one stream just terminated, another is open
    run.load_state_dict({**run.state_dict(), "env": None})
    after = [(bool(s["terminated"][-1]), bool(s["truncated"][-1])) for s in stream_rows(run.buffer)]
    assert after == [(terminated, truncated or not terminated) for terminated, truncated in newest]


def test_the_prefill_tops_up_streams_left_several_steps_short_by_autoreset_steps():
    """2 CartPole envs, prefill 200 = num_envs x seq_len 100: the autoreset steps leave each stream several
    transitions short of a window. The prefill itself (not the first update) collects on until one window fits."""
    from types import SimpleNamespace

    from worldmodel.trainer import Trainer

    plain = vector_collector("CartPole-v1", 2)
    plain.collect(200)
    assert plain.buffer.ring.sizes.max() <= 98  # short by two transitions or more: one extra vector step is not enough
    collector = vector_collector("CartPole-v1", 2)
    Trainer(steps=1, prefill=200, batch_size=1, seq_len=100, lr=1e-3)._prefill(collector, SimpleNamespace(signum=None))
    buffer = collector.buffer
    assert buffer.can_sample(100) and not buffer.can_sample(101)  # one step of every env at a time, no more
    for key, value in plain.buffer[:].items():  # the prefill itself, then only whole vector steps on top
        rows = np.concatenate([s[key][:n] for s, n in zip(stream_rows(buffer), plain.buffer.ring.sizes)])
        np.testing.assert_array_equal(rows, value, err_msg=key)
    buffer.sample(4, 100)


def test_an_env_that_autoresets_in_the_same_step_is_refused():
    """In SAME_STEP mode the step that ends an episode returns the reset observation, not the final one, and every
    step is a transition: stored with NEXT_STEP's bookkeeping, each episode's last target would be the next episode's
    first observation. The collector refuses such an env rather than store it."""
    same_step = gym.vector.AutoresetMode.SAME_STEP
    env = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2, autoreset_mode=same_step)
    with pytest.raises(ValueError, match="NEXT_STEP"):
        VectorCollector(env, ReplayBuffer(100, 4, 2, streams=2), RandomPolicy(env.action_space, 0), seed=0)


class _EndsOnEveryStep(gym.vector.VectorWrapper):
    """Breaks gymnasium's NEXT_STEP contract: its reset steps report terminated too."""

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        return obs, reward, np.ones_like(terminated), truncated, info


def test_an_env_that_ends_an_episode_on_its_reset_step_is_refused_and_nothing_is_stored():
    """A reset step is never stored (valid is False): if the env said an episode ended there, that end would be lost
    and the stream's episodes would run together. The collector stops with an error instead, before writing."""
    env = _EndsOnEveryStep(make_env("CartPole-v1", seed=0, num_envs=2))
    buffer = ReplayBuffer(100, 4, 2, streams=2)
    collector = VectorCollector(env, buffer, RandomPolicy(env.action_space, 0), seed=0)
    with pytest.raises(RuntimeError, match="NEXT_STEP"):
        collector.collect(2 * 2)  # the second vector step is every env's reset step
    assert len(buffer) == 0


def test_episode_stats_skip_reset_steps_under_a_vector_reward_wrapper_and_one_step_calls():
    """A vector-level reward wrapper (here +1 on every step) also changes the reward of reset steps, which are not
    transitions; and collecting one vector step per call (as between updates) takes the stats' fast path for each
    reset step. Either way each reported episode must be exactly its stored rows: their count and summed reward."""
    from gymnasium.wrappers.vector import TransformReward

    env = TransformReward(make_env("CartPole-v1", seed=1, num_envs=2, vectorization_mode="sync"), lambda r: r + 1.0)
    spec = env_spec(env)
    buffer = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, streams=2)
    collector = VectorCollector(env, buffer, RandomPolicy(env.action_space, 1), seed=1, spec=spec)
    reported, expected = reported_and_stored_episodes(collector, [1] * 150 + [60, 1, 1, 60], 2)
    assert len(expected) >= 10
    np.testing.assert_allclose(sorted(reported), sorted(expected), rtol=1e-9)


def test_a_sync_vector_env_pickles_with_its_state():
    """Pendulum has no batched implementation: its SyncVectorEnv is built from a partial, not make_vec's closure, so a
    checkpoint holds the envs themselves, and the copy steps on exactly as the original."""
    import pickle

    env = make_env("Pendulum-v1", seed=0, num_envs=2)
    assert isinstance(env, gym.vector.SyncVectorEnv)
    env.reset(seed=0)
    copy = pickle.loads(pickle.dumps(env))
    actions = np.full((2, 1), 0.5, np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(copy.step(actions)[0], env.step(actions)[0])


@pytest.mark.parametrize("env_id, mode", [("CartPole-v1", None), ("CartPole-v1", "sync"), ("Pendulum-v1", "sync")])
def test_two_vector_envs_of_one_seed_pickle_to_the_same_bytes(env_id, mode):
    """A checkpoint pickles the vector env: its spaces, which seed themselves from the OS when a vector env is built,
    must not make two runs of one config write different files."""
    envs = [make_env(env_id, seed=5, num_envs=3, vectorization_mode=mode) for _ in range(2)]
    for env in envs:
        env.reset(seed=5)
        env.step(env.action_space.sample())
    assert pickle.dumps(envs[0]) == pickle.dumps(envs[1])


class _IntegerBoxActions(gym.Env):
    """Box actions of an integer dtype, which the env checks as gymnasium's own envs do (obs: the action taken)."""

    def __init__(self):
        self.action_space = gym.spaces.Box(0, 3, (2,), np.int64)
        self.observation_space = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), f"{action!r} is not in {self.action_space}"
        return np.asarray(action, np.float32), 0.0, False, False, {}


@pytest.mark.parametrize("num_envs", [1, 3])
def test_an_integer_box_action_env_gets_integer_actions_with_one_env_or_several(num_envs):
    """A vector env must be given the actions one env is given: integers for an integer Box, not float32 copies (which
    fail its action_space.contains). They are stored as float vectors either way."""
    if "IntegerBoxActions-v0" not in gym.registry:
        gym.register("IntegerBoxActions-v0", entry_point=_IntegerBoxActions, max_episode_steps=5)
    env = make_env("IntegerBoxActions-v0", seed=0, num_envs=num_envs)
    spec = env_spec(env)
    buffer = ReplayBuffer(100, spec.obs_dim, spec.action_dim, streams=num_envs)
    make_collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec).collect(6 * num_envs)
    rows = buffer[:]
    assert rows["action"].dtype == np.float32 and len(rows["action"])
    np.testing.assert_array_equal(rows["next_obs"], rows["action"])  # the env saw the very actions stored
    assert set(np.unique(rows["action"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}


def episode_starts(buffer: ReplayBuffer) -> list[set[tuple]]:
    """Per stream, the initial observation of each of its episodes (rounded: compared across runs)."""
    starts = []
    for rows in stream_rows(buffer):
        first = np.concatenate([[True], (rows["terminated"] | rows["truncated"])[:-1]])
        starts.append({tuple(np.round(obs, 6)) for obs in rows["obs"][first]})
    return starts


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_envs_of_runs_with_neighbouring_seeds_share_no_episode(mode):
    """gymnasium seeds env k of a sync/async vector with seed + k: env k of seed=1 then replayed env k+1 of seed=0,
    every episode's initial state (Pendulum draws randomness at reset only), so a sweep over seeds gave runs that were
    not independent. No episode start may recur within a run or across the two."""
    runs = [vector_run("Pendulum-v1", 4, 4 * 600, seed=seed, vectorization_mode=mode)[0] for seed in (0, 1)]
    starts = [episode_starts(buffer) for buffer in runs]
    every = [obs for run in starts for stream in run for obs in stream]
    assert len(every) == 2 * 4 * 3  # 600 steps: three 200-step episodes per env
    assert len(set(every)) == len(every)


def test_a_batched_vector_env_is_seeded_with_the_run_seed_itself():
    """CartPole's own batched env draws all its envs' states from one generator: reset(seed=int), as gymnasium does."""
    buffer = vector_run("CartPole-v1", 4, 4, seed=7)[0]
    expected, _ = gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="vector_entry_point").reset(seed=7)
    np.testing.assert_array_equal(np.stack([rows["obs"][0] for rows in stream_rows(buffer)]), expected)


def test_async_env_workers_leave_a_stop_signal_to_the_training_process():
    """Ctrl-C in a terminal, and SLURM's preemption, signal the whole process group: an async env's workers too. A
    worker that died of it (SIGTERM) or reported a KeyboardInterrupt (SIGINT) made the training process's next env
    step fail with a traceback, so the run ended without the checkpoint its stop promises."""
    env = make_env("CartPole-v1", seed=0, num_envs=2, vectorization_mode="async")
    processes = list(env.processes)
    try:
        env.reset(seed=0)
        for process in processes:
            os.kill(process.pid, signal.SIGINT)
            os.kill(process.pid, signal.SIGTERM)
        time.sleep(0.5)  # for the signals to arrive: a worker that acted on them would be dead or have replied
        env.step(np.zeros(2, dtype=np.int64))
        assert all(p.is_alive() for p in processes)
    finally:
        env.close()
    assert not any(p.is_alive() for p in processes)
