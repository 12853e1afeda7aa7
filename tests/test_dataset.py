"""The .npz episode format: exact round trip through the replay buffer, and clear errors for malformed files."""

from __future__ import annotations

import numpy as np
import pytest

from worldmodel import RandomPolicy, ReplayBuffer, make_env
from worldmodel.dataset import DatasetError, buffer_to_episodes, collect_episodes, episodes_to_buffer, load_dataset, save_dataset
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


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: {k: v for k, v in d.items() if k != "rewards"}, "missing key(s) ['rewards']"),
        (lambda d: malformed(d, "obs", d["obs"][:, :, :3]), "`obs` has shape"),
        (lambda d: malformed(d, "actions", d["actions"][:, :-1]), "`actions` has shape"),
        (lambda d: malformed(d, "rewards", d["rewards"][None]), "`rewards` has shape"),
        (lambda d: malformed(d, "lengths", d["lengths"] + 100), "`lengths` must hold"),
        (lambda d: malformed(d, "actions", d["actions"] + 5), "outside 0..1"),
        (lambda d: malformed(d, "obs", np.where(np.arange(d["obs"].shape[1])[None, :, None] == 1, np.nan, d["obs"])),
         "`obs` holds"),
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


def test_buffer_loads_a_dataset_and_refuses_one_larger_than_its_capacity(tmp_path):
    spec, data = record("Pendulum-v1", 2)  # 400 transitions
    save_dataset(tmp_path / "d.npz", data)
    assert len(ReplayBuffer(1000, 3, 1, dataset=tmp_path / "d.npz")) == 400
    with pytest.raises(ConfigError, match="buffer.capacity"):
        ReplayBuffer(300, 3, 1, dataset=tmp_path / "d.npz")
