"""The .npz episode format: exact round trip through the replay buffer, and clear errors for malformed files."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from worldmodel import RandomPolicy, ReplayBuffer, make_env
from worldmodel.dataset import (DatasetError, DatasetFile, buffer_to_episodes, collect_episodes, episodes_to_buffer,
                                fill_buffer, load_dataset, non_finite, require_dataset, save_dataset)
from worldmodel.env import env_spec
from worldmodel.errors import ConfigError


def record(env_id: str, episodes: int):
    env = make_env(env_id, seed=0)
    spec = env_spec(env)
    return spec, collect_episodes(env, spec, RandomPolicy(env.action_space, 0), episodes, seed=0, chunk=50)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_round_trip_through_file_and_buffer(tmp_path, env_id):
    spec, data = record(env_id, 4)
    assert data["obs"].shape == (4, data["lengths"].max() + 1, spec.obs_dim)
    assert data["actions"].shape[:2] == (4, data["lengths"].max())
    assert (data["actions"].ndim == 2) is spec.discrete
    save_dataset(tmp_path / "d.npz", data)
    loaded = load_dataset(tmp_path / "d.npz", spec.obs_dim, spec.action_dim)
    buffer = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim)
    episodes_to_buffer(buffer, loaded)
    again = buffer_to_episodes(buffer, spec.discrete)
    for key in ("obs", "actions", "rewards", "terminated", "truncated", "lengths"):
        np.testing.assert_array_equal(again[key], data[key])
    rows = buffer[:]
    ends = np.flatnonzero(rows["terminated"] | rows["truncated"])
    assert (ends + 1).tolist() == np.cumsum(data["lengths"]).tolist()  # one episode end per recorded episode
    if spec.discrete:
        assert set(rows["action"].sum(1)) == {1.0}  # indices become one-hot


def test_an_episode_cut_short_is_stored_as_truncated(tmp_path):
    spec, data = record("CartPole-v1", 2)
    data["lengths"][0] -= 1  # the recorded end of episode 0 is dropped: neither flag is set on its last step now
    buffer = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim)
    episodes_to_buffer(buffer, data)
    first_end = int(data["lengths"][0]) - 1
    assert buffer[first_end]["truncated"] and not buffer[first_end]["terminated"]


def malformed(data, key, value):
    return {**data, key: value}


def nan_in_final_observations(data):
    """NaN at obs[i, lengths[i]] alone: each episode's final observation, the last transition's next_obs target (the
    padding after it may hold anything)."""
    obs = data["obs"].copy()
    obs[np.arange(len(obs)), data["lengths"]] = np.nan
    return malformed(data, "obs", obs)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: {k: v for k, v in d.items() if k != "rewards"}, "missing key(s) ['rewards']"),
        (lambda d: malformed(d, "obs", d["obs"][:, :, :3]), "`obs` has shape"),
        (lambda d: malformed(d, "actions", d["actions"][:, :-1]), "`actions` has shape"),
        (lambda d: malformed(d, "rewards", d["rewards"][None]), "`rewards` has shape"),
        (lambda d: malformed(d, "lengths", d["lengths"] + 100), "`lengths` must hold"),
        # An episode of no steps has no transition to store (and no last step to mark as the episode's end).
        (lambda d: malformed(d, "lengths", np.where(np.arange(len(d["lengths"])) == 1, 0, d["lengths"])),
         "`lengths` must hold"),
        (lambda d: malformed(d, "actions", d["actions"] + 5), "outside 0..1"),
        # Index 2, one past CartPole's last action, in the first (always valid) step of each episode.
        (lambda d: malformed(d, "actions", np.where(np.arange(d["actions"].shape[1]) == 0, 2, d["actions"])),
         "outside 0..1"),
        (lambda d: malformed(d, "obs", np.where(np.arange(d["obs"].shape[1])[None, :, None] == 1, np.nan, d["obs"])),
         "`obs` holds"),
        (nan_in_final_observations, "`obs` holds 12 NaN/inf"),  # 3 episodes x 4 CartPole dims
        (lambda d: malformed(d, "terminated", d["terminated"] * 0.5), "`terminated` has shape"),
        (lambda d: malformed(d, "truncated", d["truncated"].astype(str)), "booleans (or 0/1 numbers)"),
        (lambda d: malformed(d, "actions", d["actions"].astype(np.float32)), "integer action indices (Discrete"),
    ],
)
def test_malformed_files_name_the_key(tmp_path, break_it, message):
    spec, data = record("CartPole-v1", 3)
    path = tmp_path / "bad.npz"
    np.savez(path, **break_it(data))
    with pytest.raises(DatasetError) as err:
        load_dataset(path, spec.obs_dim, spec.action_dim)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unreadable_or_missing_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset(tmp_path / "junk.npz", 4, 2)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "none.npz", 4, 2)
    # A directory (buffer.dataset=<a run dir>) is no dataset file either: refused before np.load is tried on it, as
    # what it is (it exists).
    with pytest.raises(DatasetError, match="is a directory; give the path of a .npz file in it"):
        require_dataset(tmp_path)


def test_buffer_loads_a_dataset_and_refuses_one_larger_than_its_capacity(tmp_path):
    spec, data = record("Pendulum-v1", 2)  # 400 transitions
    save_dataset(tmp_path / "d.npz", data)
    assert len(ReplayBuffer(1000, 3, 1, dataset=tmp_path / "d.npz")) == 400
    with pytest.raises(ConfigError, match="buffer.capacity"):
        ReplayBuffer(300, 3, 1, dataset=tmp_path / "d.npz")


def rows_of(obs: list[float], done_at: list[int]) -> dict[str, np.ndarray]:
    """Transitions with obs_dim 1: obs t, next_obs t + 0.5, terminated on the steps in done_at."""
    obs = np.array(obs, dtype=np.float32)[:, None]
    n = len(obs)
    return {"obs": obs, "action": np.zeros((n, 1), np.float32), "reward": np.zeros(n, np.float32),
            "next_obs": obs + 0.5, "terminated": np.isin(obs[:, 0], done_at), "truncated": np.zeros(n, bool)}  # fmt: skip


def test_export_keeps_only_episodes_that_start_at_a_reset_and_stay_in_one_stream():
    # One stream that wrapped: rows 0..2 were overwritten, so the stored part of episode 0-5 starts mid-episode.
    wrapped = ReplayBuffer(7, 1, 1)
    wrapped.extend(**rows_of(list(range(10)), done_at=[5, 9]))
    out = buffer_to_episodes(wrapped, discrete=False)
    assert out["lengths"].tolist() == [4] and out["obs"][0, :, 0].tolist() == [6, 7, 8, 9, 9.5]
    # Two streams of 5 rows, neither full: stream 0's unfinished episode (12, 13) must not be joined to stream 1's
    # first one. (A full stream's oldest episode is left out even if nothing was overwritten: the ring cannot tell.)
    two = ReplayBuffer(10, 1, 1, streams=2)
    two.extend(**rows_of([10, 11, 12, 13], done_at=[11]), stream=0)
    two.extend(**rows_of([20, 21], done_at=[21]), stream=1)
    out = buffer_to_episodes(two, discrete=False)
    assert out["lengths"].tolist() == [2, 2]
    assert out["obs"][:, :, 0].tolist() == [[10, 11, 11.5], [20, 21, 21.5]]


def test_collecting_episodes_longer_than_the_buffer_guess_keeps_their_start():
    """An env without a registered time limit: collect_episodes guesses 1000 steps per episode, and must grow its
    buffer rather than overwrite the start of a longer episode."""
    import gymnasium as gym
    from gymnasium.envs.classic_control import PendulumEnv

    def make():
        return gym.wrappers.TimeLimit(PendulumEnv(), max_episode_steps=2500)

    env = make()
    assert env.spec is None
    spec = env_spec(env)
    data = collect_episodes(env, spec, RandomPolicy(env.action_space, 0), episodes=1, seed=0, chunk=500)
    assert data["lengths"].tolist() == [2500] and data["truncated"][0, 2499]
    np.testing.assert_array_equal(data["obs"][0, 0], make().reset(seed=0)[0])


def test_flags_stored_as_0_1_numbers_load_as_booleans(tmp_path):
    spec, data = record("CartPole-v1", 3)
    path = tmp_path / "flags.npz"
    np.savez(path, **{**data, "terminated": data["terminated"].astype(np.float32), "truncated": data["truncated"] * 1})
    loaded = load_dataset(path, spec.obs_dim, spec.action_dim)
    for name in ("terminated", "truncated"):
        assert loaded[name].dtype == bool and np.array_equal(loaded[name], data[name])


def small_dataset(lengths: list[int]) -> dict[str, np.ndarray]:
    """Episodes with obs_dim 1 and Box actions of dim 1; obs[i, t] = 100 i + t, so every stored row is identifiable."""
    n, t = len(lengths), max(lengths)
    obs = (100 * np.arange(n)[:, None] + np.arange(t + 1)[None, :]).astype(np.float32)[:, :, None]
    terminated = np.arange(t)[None, :] == np.array(lengths)[:, None] - 1
    return {"obs": obs, "actions": np.zeros((n, t, 1), np.float32), "rewards": np.zeros((n, t), np.float32),
            "terminated": terminated, "truncated": np.zeros((n, t), bool),
            "lengths": np.array(lengths, np.int64)}  # fmt: skip


@pytest.mark.parametrize(
    "streams, fits, too_small, need",
    [(1, [14, 15], [13, 7], 14), (2, [18, 19], [17, 16], 18)],  # 2 streams: episodes 0, 2 (5 rows) and 1, 3 (9 rows)
)
def test_dataset_capacity_boundary(tmp_path, streams, fits, too_small, need):
    """A dataset that exactly fills the buffer loads whole; one row more is refused, naming buffer.capacity and file."""
    lengths = [3, 5, 2, 4]
    path = tmp_path / "d.npz"
    save_dataset(path, small_dataset(lengths))
    ids = [[100 * i + t for t in range(n)] for i, n in enumerate(lengths)]
    expected = [row for k in range(streams) for episode in ids[k::streams] for row in episode]
    for capacity in fits:
        buffer = ReplayBuffer(capacity, 1, 1, dataset=path, streams=streams)
        assert len(buffer) == 14
        assert buffer[:]["obs"][:, 0].tolist() == expected  # nothing overwritten, every episode from its start
    for capacity in too_small:
        with pytest.raises(ConfigError) as err:
            ReplayBuffer(capacity, 1, 1, dataset=path, streams=streams)
        message = str(err.value)
        assert f"buffer.capacity={capacity}" in message and f"at least {need}" in message and str(path) in message


def test_a_dataset_of_the_other_kind_of_actions_is_refused(tmp_path):
    """A Discrete env's action indices are integers; read for a Box env of the same width, index 0 passed as a 1-wide
    action vector (and other indices failed as 'outside 0..0'). Given the env's kind, the mismatch is named."""
    for env_id, discrete in (("CartPole-v1", True), ("Pendulum-v1", False)):
        spec, data = record(env_id, 2)
        path = tmp_path / f"{env_id}.npz"
        np.savez(path, **data)
        load_dataset(path, spec.obs_dim, spec.action_dim, discrete=discrete)  # its own kind
        held = "integer action indices (a Discrete env's)" if discrete else "action vectors (a Box env's)"
        expected = f"holds {held}, but this env has {'Box' if discrete else 'Discrete'} actions: it was recorded from"
        with pytest.raises(DatasetError, match=re.escape(expected)):
            ReplayBuffer(1000, spec.obs_dim, spec.action_dim, dataset=path, discrete_actions=not discrete)


def buffers_equal(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert (a.ring.sizes == b.ring.sizes).all()
    for key, value in a[:].items():
        np.testing.assert_array_equal(b[:][key], value, err_msg=key)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_a_dataset_read_a_few_episodes_at_a_time_fills_the_buffer_as_one_read_does(tmp_path, env_id):
    """A buffer reads its dataset a block at a time, so a file as large as the ring is never held whole beside it.
    Blocks of 1 to 3 episodes (of 7, over 3 streams) must deal every episode to the stream a single read gives it."""
    spec, data = record(env_id, 7)
    save_dataset(tmp_path / "d.npz", data)
    whole = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, streams=3)
    episodes_to_buffer(whole, load_dataset(tmp_path / "d.npz", spec.obs_dim, spec.action_dim))
    t = data["obs"].shape[1]
    for episodes in (1, 2, 3):
        with DatasetFile(tmp_path / "d.npz", spec.obs_dim, spec.action_dim, block_rows=episodes * t) as file:
            assert [len(b["lengths"]) for b in file.blocks()] == [episodes] * (7 // episodes) + [7 % episodes] * (
                7 % episodes > 0)
        blocks = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, streams=3)
        with DatasetFile(tmp_path / "d.npz", spec.obs_dim, spec.action_dim, block_rows=episodes * t) as file:
            fill_buffer(blocks, file)
        buffers_equal(whole, blocks)
    buffers_equal(whole, ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, streams=3, dataset=tmp_path / "d.npz"))


def test_non_finite_values_are_counted_over_every_block_before_the_file_is_refused(tmp_path):
    """NaN in episodes 0 and 5 of 6, read one episode at a time: the message counts both, as a single read does."""
    spec, data = record("CartPole-v1", 6)
    obs = data["obs"].copy()
    obs[[0, 5], 1] = np.nan
    np.savez(tmp_path / "nan.npz", **malformed(data, "obs", obs))
    expected = "key `obs` holds 8 NaN/inf value(s) in valid steps"  # 2 episodes x 4 CartPole dims
    with pytest.raises(DatasetError, match=re.escape(expected)):
        load_dataset(tmp_path / "nan.npz", spec.obs_dim, spec.action_dim)
    with DatasetFile(tmp_path / "nan.npz", spec.obs_dim, spec.action_dim, block_rows=1) as file:
        with pytest.raises(DatasetError, match=re.escape(expected)):
            list(file.blocks())


def test_column_major_big_endian_and_uncompressed_arrays_read_as_they_were_saved(tmp_path):
    """np.savez keeps what it is given: a transposed (column-major) array, another byte order, no compression."""
    spec, data = record("Pendulum-v1", 3)
    odd = {**data, "obs": np.asfortranarray(data["obs"]), "rewards": data["rewards"].astype(">f8"),
           "actions": np.asfortranarray(data["actions"]).astype(">f4")}  # fmt: skip
    assert odd["obs"].flags.f_contiguous and not odd["obs"].flags.c_contiguous
    np.savez(tmp_path / "odd.npz", **odd)
    with DatasetFile(tmp_path / "odd.npz", spec.obs_dim, spec.action_dim, block_rows=1) as file:
        blocks = list(file.blocks())
    assert len(blocks) == 3
    for key in ("obs", "actions", "rewards"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), data[key], err_msg=key)


def test_a_file_cut_short_or_holding_objects_is_not_readable(tmp_path):
    spec, data = record("CartPole-v1", 3)
    save_dataset(tmp_path / "d.npz", data)
    whole = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset(tmp_path / "cut.npz", spec.obs_dim, spec.action_dim)
    np.savez(tmp_path / "plain.npz", **data)  # stored, not deflated: a changed byte reaches the CRC check as it is
    plain = bytearray((tmp_path / "plain.npz").read_bytes())
    plain[plain.index(data["obs"].tobytes()[:64]) + 100] ^= 0xFF
    (tmp_path / "changed.npz").write_bytes(bytes(plain))
    with pytest.raises(DatasetError, match="not a readable .npz.*CRC"):
        load_dataset(tmp_path / "changed.npz", spec.obs_dim, spec.action_dim)
    np.savez(tmp_path / "objects.npz", **malformed(data, "rewards", data["rewards"].astype(object)))
    with pytest.raises(DatasetError, match="not a readable .npz.*Python objects"):
        load_dataset(tmp_path / "objects.npz", spec.obs_dim, spec.action_dim)


# ---- the reader's edges: what a hand-written or foreign .npz may hold -----------------------------------------------


def write_npz(path, arrays: dict[str, np.ndarray], raw: dict[str, bytes] | None = None) -> None:
    """An uncompressed .npz of `arrays`, with the .npy bytes of the members in `raw` as given instead."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            npy = io.BytesIO()
            np.save(npy, value)
            archive.writestr(f"{key}.npy", (raw or {}).get(key, npy.getvalue()))


def discrete_dataset(lengths: list[int]) -> dict[str, np.ndarray]:
    """small_dataset with action indices of a 2-action Discrete env: actions[i, t] = (i + t) % 2."""
    data = small_dataset(lengths)
    n, t = data["rewards"].shape
    return {**data, "actions": (np.arange(n)[:, None] + np.arange(t)[None, :]) % 2}


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: malformed(d, "obs", d["obs"][:, :, 0]), "`obs` has shape [3, 6]"),  # no obs axis
        # T = 0: one observation per episode and no step at all.
        (lambda d: {**{k: v[:, :0] for k, v in d.items() if k != "lengths"}, "obs": d["obs"][:, :1],
                    "lengths": d["lengths"]}, "`obs` has shape [3, 1, 1]"),  # fmt: skip
        (lambda d: malformed(d, "actions", np.zeros((3, 5, 2), np.float32)), "`actions` has shape [3, 5, 2]"),
        (lambda d: malformed(d, "lengths", d["lengths"].astype(np.float64)), "`lengths` has shape [3] (dtype float64)"),
        (lambda d: malformed(d, "lengths", np.array([3, 6, 2])), "`lengths` must hold"),  # 6 > T = 5
        (lambda d: {k: v[:0] for k, v in d.items()}, "`lengths` must hold N >= 1"),  # no episode at all
    ],
)
def test_malformed_box_datasets_name_the_key(tmp_path, break_it, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **break_it(small_dataset([3, 5, 2])))
    with pytest.raises(DatasetError) as err:
        load_dataset(path, 1, 1)
    assert message in str(err.value) and str(path) in str(err.value)


def test_flags_that_are_not_numbers_are_refused_on_opening_before_any_block(tmp_path):
    path = tmp_path / "flags.npz"
    data = small_dataset([3, 5, 2])
    np.savez(path, **malformed(data, "terminated", data["terminated"].astype(str)))
    expected = "`terminated` has shape [3, 5] (dtype <U5), expected [3, 5] booleans"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        DatasetFile(path, 1, 1)


def test_discrete_actions_stored_as_n_t_1_read_as_indices(tmp_path):
    data = discrete_dataset([3, 5, 2])
    path = tmp_path / "d.npz"
    np.savez(path, **malformed(data, "actions", data["actions"][:, :, None].astype(np.int32)))
    loaded = load_dataset(path, 1, 2, discrete=True)
    assert loaded["actions"].shape == (3, 5) and np.array_equal(loaded["actions"], data["actions"])
    buffer = ReplayBuffer(100, 1, 2, dataset=path, discrete_actions=True)
    expected = [a for i, n in enumerate([3, 5, 2]) for a in data["actions"][i, :n]]
    assert buffer[:]["action"].argmax(1).tolist() == expected and set(buffer[:]["action"].sum(1)) == {1.0}


def test_action_indices_are_checked_in_valid_steps_only(tmp_path):
    """Padding may hold any index (here one past the last action, at step lengths[i]); a valid -1 is refused too,
    also when the buffer reads the file (the one-hot of an index outside the env's actions is never taken)."""
    data = discrete_dataset([3, 5, 2])
    actions = data["actions"].copy()
    actions[[0, 2], [3, 2]] = 2
    np.savez(tmp_path / "padding.npz", **malformed(data, "actions", actions))
    assert np.array_equal(load_dataset(tmp_path / "padding.npz", 1, 2)["actions"], actions)
    for index in (-1, 2):
        actions = data["actions"].copy()
        actions[1, 4] = index  # the last valid step of episode 1
        np.savez(tmp_path / "bad.npz", **malformed(data, "actions", actions))
        with pytest.raises(DatasetError, match=re.escape("`actions` holds indices outside 0..1")):
            load_dataset(tmp_path / "bad.npz", 1, 2)
        with pytest.raises(DatasetError, match=re.escape("`actions` holds indices outside 0..1")):
            ReplayBuffer(100, 1, 2, dataset=tmp_path / "bad.npz")


def test_non_finite_values_in_padding_are_not_counted(tmp_path):
    data = small_dataset([3, 5, 2])
    obs, rewards = data["obs"].copy(), data["rewards"].copy()
    obs[0, 4:], obs[2, 3:] = np.nan, np.inf  # after each episode's final observation obs[i, lengths[i]]
    rewards[0, 3:], rewards[2, 2:] = np.nan, -np.inf  # from step lengths[i] on
    assert non_finite({**data, "obs": obs, "rewards": rewards}) == {}  # what collect.py checks before writing
    np.savez(tmp_path / "d.npz", **{**data, "obs": obs, "rewards": rewards})
    assert len(ReplayBuffer(100, 1, 1, dataset=tmp_path / "d.npz")) == 10
    rewards[1, 4] = np.nan  # episode 1's last step
    assert non_finite({**data, "obs": obs, "rewards": rewards}) == {"rewards": 1}


def test_no_block_of_a_file_with_bad_values_is_handed_out(tmp_path):
    """Values are refused at the end of the file (NaN/inf, counted over all blocks, named first when indices are bad
    too), but no block is handed out after the first bad one: the episodes before it come out, none from it on."""
    data = discrete_dataset([3, 5, 2, 4])
    obs = data["obs"].copy()
    obs[1, 0] = np.nan
    actions = data["actions"].copy()
    actions[1, 0] = 7
    for name, bad, message in (("nan", {"obs": obs}, "NaN/inf"), ("index", {"actions": actions}, "outside 0..1"),
                               ("both", {"obs": obs, "actions": actions}, "`obs` holds 1 NaN/inf")):
        np.savez(tmp_path / f"{name}.npz", **{**data, **bad})
        handed_out = []
        with DatasetFile(tmp_path / f"{name}.npz", 1, 2, block_rows=6) as file:  # one episode (T + 1 = 6 rows) a block
            with pytest.raises(DatasetError, match=message):
                for block in file.blocks():
                    handed_out.append(block["obs"][:, 0, 0].tolist())
        assert handed_out == [[0.0]]  # episode 0 alone


def test_block_rows_count_every_padded_step_and_the_final_observation(tmp_path):
    """block_rows is a number of rows of obs: T + 1 per episode."""
    path = tmp_path / "d.npz"
    save_dataset(path, small_dataset([3, 5, 2, 4, 1]))  # T + 1 = 6 rows per episode
    for rows, episodes in ((11, [1] * 5), (12, [2, 2, 1]), (17, [2, 2, 1]), (18, [3, 2]), (1, [1] * 5), (10**6, [5])):
        with DatasetFile(path, 1, 1, block_rows=rows) as file:
            assert [len(b["lengths"]) for b in file.blocks()] == episodes, rows


def test_two_dimensional_column_major_arrays_read_as_they_were_saved(tmp_path):
    data = discrete_dataset([3, 5, 2, 4])
    data["rewards"] = np.arange(20, dtype=np.float32).reshape(4, 5)
    odd = {**data, "rewards": np.asfortranarray(data["rewards"]), "actions": np.asfortranarray(data["actions"]),
           "terminated": np.asfortranarray(data["terminated"])}  # fmt: skip
    assert odd["rewards"].flags.f_contiguous and not odd["rewards"].flags.c_contiguous
    np.savez(tmp_path / "odd.npz", **odd)
    with DatasetFile(tmp_path / "odd.npz", 1, 2, block_rows=6) as file:
        blocks = list(file.blocks())
    for key in ("actions", "rewards", "terminated"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), data[key], err_msg=key)


@pytest.mark.parametrize("key", ["rewards", "lengths"])
def test_a_member_shorter_than_its_header_says_is_not_readable(tmp_path, key):
    """A .npy header that promises more rows than the member holds: refused, never filled with whatever memory held."""
    import io

    data = small_dataset([3, 5, 2])
    npy = io.BytesIO()
    np.save(npy, data[key])
    cut = data[key][-1].nbytes  # the last row
    write_npz(tmp_path / "short.npz", data, raw={key: npy.getvalue()[:-cut]})
    with pytest.raises(DatasetError, match=re.escape(f"not a readable .npz file (EOFError: the file ends {cut} bytes")):
        load_dataset(tmp_path / "short.npz", 1, 1)


def test_an_unknown_npy_version_is_not_readable(tmp_path):
    import io

    data = small_dataset([3, 5, 2])
    npy = io.BytesIO()
    np.save(npy, data["rewards"])
    v3 = bytearray(npy.getvalue())
    v3[6] = 3  # the major version byte after the magic string
    write_npz(tmp_path / "v3.npz", data, raw={"rewards": bytes(v3)})
    with pytest.raises(DatasetError, match=re.escape("rewards.npy: .npy format version (3, 0) is not supported")):
        load_dataset(tmp_path / "v3.npz", 1, 1)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files in /proc")
def test_the_file_is_closed_after_use_and_after_a_shape_error(tmp_path):
    save_dataset(tmp_path / "d.npz", small_dataset([3, 5, 2]))
    before = open_fds()
    with DatasetFile(tmp_path / "d.npz", 1, 1, block_rows=6) as file:
        next(file.blocks())  # left after one block
        assert open_fds() == before + 1
    assert open_fds() == before  # `file` is still referenced: closing it closed its file
    data = small_dataset([3, 5, 2])
    np.savez(tmp_path / "bad.npz", **malformed(data, "rewards", data["rewards"][:, :-1]))
    with pytest.raises(DatasetError, match="`rewards` has shape") as err:
        DatasetFile(tmp_path / "bad.npz", 1, 1)
    assert err.value.__traceback__ is not None and open_fds() == before  # while the error (and its frames) live


def test_an_episode_ended_by_both_flags_keeps_both():
    data = small_dataset([3, 2])
    data["truncated"] = data["terminated"].copy()  # a time limit reached on the terminating step
    buffer = ReplayBuffer(100, 1, 1)
    episodes_to_buffer(buffer, data)
    rows = buffer[:]
    assert rows["terminated"].tolist() == rows["truncated"].tolist() == [False, False, True, False, True]


def test_a_failed_save_leaves_the_existing_dataset_whole(tmp_path):
    path = tmp_path / "d.npz"
    save_dataset(path, small_dataset([3, 5, 2]))
    with pytest.raises(KeyError):
        save_dataset(path, {k: v for k, v in small_dataset([4]).items() if k != "lengths"})
    assert load_dataset(path, 1, 1)["lengths"].tolist() == [3, 5, 2]


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_a_member_that_fails_to_open_leaves_no_file_open(tmp_path):
    """Every member holds the zip's file open: one opened before the member that fails must be closed too, even
    while the error (and its traceback) is alive."""
    spec, data = record("CartPole-v1", 2)
    np.savez(tmp_path / "objects.npz", **malformed(data, "rewards", data["rewards"].astype(object)))
    before = open_files()
    with pytest.raises(DatasetError):
        DatasetFile(tmp_path / "objects.npz", spec.obs_dim, spec.action_dim)
    assert open_files() == before


@pytest.mark.parametrize("key, value", [("obs", "a"), ("obs", "1.5"), ("rewards", 1 + 2j), ("actions", "0.5")])
def test_values_that_are_not_real_numbers_are_refused_naming_the_key(tmp_path, key, value):
    """Text failed deep in the NaN check with numpy's own message (or, where it reads as a number, loaded)."""
    spec, data = record("Pendulum-v1", 2)
    np.savez(tmp_path / "d.npz", **malformed(data, key, np.full(data[key].shape, value)))
    with pytest.raises(DatasetError, match=f"key `{key}` has shape .* expected real numbers"):
        load_dataset(tmp_path / "d.npz", spec.obs_dim, spec.action_dim)


def test_a_save_that_fails_leaves_no_temporary_file(tmp_path):
    spec, data = record("CartPole-v1", 2)
    with pytest.raises(KeyError):
        save_dataset(tmp_path / "d.npz", {k: v for k, v in data.items() if k != "lengths"})
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_file_is_read_once(tmp_path):
    spec, data = record("CartPole-v1", 2)
    save_dataset(tmp_path / "d.npz", data)
    with DatasetFile(tmp_path / "d.npz", spec.obs_dim, spec.action_dim) as file:
        assert len(list(file.blocks())) == 1
        with pytest.raises(RuntimeError, match="reads the file once"):
            list(file.blocks())  # not "the file ends ... bytes early", which would blame a good file


@pytest.mark.parametrize("flag", ["terminated", "truncated"])
def test_a_flag_before_an_episodes_last_step_is_refused_naming_the_episode(tmp_path, flag):
    """Two episodes stored in one row (a concatenation): the rows after the first flag would be stored as transitions
    from one episode's final observation into the next episode, which no env step made."""
    data = small_dataset([3, 5, 2])
    flags = data[flag].copy()
    flags[1, 1] = True  # episode 1 (5 steps) flagged at step 1
    np.savez(tmp_path / "d.npz", **{**data, flag: flags})
    with pytest.raises(DatasetError, match=r"episode 1 has `terminated` or `truncated` set at step 1, before its last"):
        ReplayBuffer(100, 1, 1, dataset=tmp_path / "d.npz")
    flags[1, 1], flags[1, 4] = False, True  # at the last valid step, as every recorded episode has it: loads
    flags[2, 3] = True  # and in padding, after the last valid step: ignored
    np.savez(tmp_path / "d.npz", **{**data, flag: flags})
    assert len(ReplayBuffer(100, 1, 1, dataset=tmp_path / "d.npz")) == 10
