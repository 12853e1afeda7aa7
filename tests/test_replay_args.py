"""The replay buffer's Python API with the inputs a researcher's own code passes: reversed views, torch tensors of
any dtype, empty index lists, and wrong arguments, which must be refused by name rather than misread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import worldmodel.ring
from worldmodel.errors import NotEnoughDataError, WorldModelError
from worldmodel.replay import ReplayBuffer
from worldmodel.runtime import cgroup_memory_room, free_memory


def buffer(rows: int = 6, obs_dtype: str = "float32", streams: int = 1) -> ReplayBuffer:
    buf = ReplayBuffer(16, obs_dim=3, action_dim=1, obs_dtype=obs_dtype, streams=streams)
    for stream in range(streams):
        buf.extend(
            obs=np.arange(rows * 3, dtype=np.float32).reshape(rows, 3),
            action=np.zeros((rows, 1), np.float32),
            reward=np.arange(rows, dtype=np.float32),
            next_obs=np.arange(3, rows * 3 + 3, dtype=np.float32).reshape(rows, 3),
            terminated=np.zeros(rows, bool),
            truncated=np.zeros(rows, bool),
            stream=stream,
        )
    return buf


@pytest.mark.parametrize("obs_dtype", ["float32", "float16", "bfloat16"])
def test_reversed_views_are_written_as_numpy_reads_them(obs_dtype):
    buf = buffer(4, obs_dtype)
    reward = np.arange(4, dtype=np.float32)
    to_go = np.cumsum(reward[::-1])[::-1]  # reward-to-go: a view with a negative stride
    buf.update(slice(None), reward=to_go)
    np.testing.assert_array_equal(buf[:]["reward"], [6, 6, 5, 3])
    obs = np.arange(12, dtype=np.float32).reshape(4, 3)[::-1]
    buf.extend(obs=obs, action=np.zeros((4, 1), np.float32)[::-1], reward=reward[::-1], next_obs=obs,
               terminated=np.zeros(4, bool)[::-1], truncated=np.zeros(4, bool))  # fmt: skip
    np.testing.assert_array_equal(buf[-4:]["obs"], obs)
    np.testing.assert_array_equal(buf[-4:]["reward"], [3, 2, 1, 0])
    one = np.cumsum(reward[:1][::-1])[::-1]  # a one-step episode's: numpy calls it contiguous, its stride is negative
    buf.update([-1], reward=one)
    buf.add(obs=obs[:1][::-1][0], action=[0.0], reward=one[0], next_obs=obs[0], terminated=False, truncated=False)
    assert buf[-2:]["reward"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_tensors_of_any_float_dtype_are_stored(dtype):
    buf = ReplayBuffer(16, obs_dim=3, action_dim=1, obs_dtype="bfloat16")
    obs = torch.arange(12, dtype=dtype).reshape(4, 3)  # small integers: exact in every dtype
    buf.extend(obs=obs, action=torch.ones(4, 1, dtype=dtype), reward=torch.arange(4, dtype=dtype), next_obs=obs + 3,
               terminated=torch.zeros(4, dtype=torch.bool), truncated=torch.zeros(4, dtype=torch.bool))  # fmt: skip
    buf.add(obs=obs[0], action=torch.ones(1, dtype=dtype), reward=torch.tensor(7, dtype=dtype), next_obs=obs[1],
            terminated=False, truncated=True)  # fmt: skip
    buf.update([0, 1], reward=torch.tensor([5.0, 6.0], dtype=dtype))
    rows = buf[:]
    np.testing.assert_array_equal(rows["obs"], np.concatenate([obs.float().numpy(), obs[:1].float().numpy()]))
    np.testing.assert_array_equal(rows["reward"], [5, 6, 2, 3, 7])
    assert rows["truncated"].tolist() == [False] * 4 + [True]


def test_an_empty_index_reads_and_updates_nothing():
    buf = buffer()
    assert {k: v.shape[0] for k, v in buf[[]].items()} == dict.fromkeys(buf[[]], 0)
    before = buf[:]
    buf.update([], reward=1.0)
    for key, value in buf[:].items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda b: b.sample(4, 0), ValueError, "seq_len must be an integer >= 1, got 0"),
        (lambda b: b.sample(4, 2.5), TypeError, "seq_len must be an integer >= 1, got 2.5"),
        (lambda b: b.sample(-1, 2), ValueError, "batch_size must be an integer >= 0, got -1"),
        (lambda b: b.sample_rows(4, 0), ValueError, "seq_len must be an integer >= 1"),
        (lambda b: b.can_sample(2.5), TypeError, "seq_len must be an integer"),
        (lambda b: list(b.sequences(0, 4)), ValueError, "seq_len must be an integer >= 1"),
        (lambda b: list(b.sequences(2, 0)), ValueError, "batch_size must be an integer >= 1, got 0"),
        (lambda b: b.gather([0], -1), ValueError, "seq_len must be an integer >= 1, got -1"),
        (lambda b: b.gather([0], 0), ValueError, "seq_len must be an integer >= 1, got 0"),
        (lambda b: b.gather([1.7, 3.2], 2), TypeError, "ring indices must be integers"),
    ],
)
def test_wrong_sizes_and_starts_are_refused_by_name(call, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        call(buffer())


def test_not_enough_data_is_per_stream_and_says_so():
    buf = buffer(rows=3, streams=2)  # 6 rows, but no stream holds 4
    assert len(buf) == 6 and not buf.can_sample(4)
    with pytest.raises(NotEnoughDataError, match="longest stream holds 3 transitions and needs at least 4"):
        buf.sample(1, 4)


def test_numpy_integers_are_sizes_too():
    batch = buffer().sample(np.int64(2), np.int32(3))
    assert tuple(batch.obs.shape) == (2, 3, 3)


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"reward": 0.0}, r"\['reward'\] are single values; extend takes rows along a leading axis"),
        ({"reward": np.zeros(2)}, r"columns have different lengths \{'obs': 3, 'action': 3, 'reward': 2,"),
    ],
)
def test_malformed_extends_name_the_column_and_write_nothing(columns, message):
    buf = buffer()
    before = buf[:]
    rows = dict(obs=np.zeros((3, 3)), action=np.zeros((3, 1)), reward=np.zeros(3), next_obs=np.zeros((3, 3)),
                terminated=np.zeros(3, bool), truncated=np.zeros(3, bool))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        buf.extend(**{**rows, **columns})
    for key, value in buf[:].items():
        np.testing.assert_array_equal(value, before[key])


def test_loading_an_episode_dataset_as_a_saved_buffer_says_what_it_is(tmp_path):
    path = tmp_path / "episodes.npz"
    np.savez(path, obs=np.zeros((2, 3)), actions=np.zeros(1), rewards=np.zeros(1), terminated=np.zeros(1, bool),
             truncated=np.zeros(1, bool), lengths=np.ones(1, np.int64))  # fmt: skip
    with pytest.raises(ValueError, match=r"was not written by ReplayBuffer\.save.*dataset=path"):
        buffer().load(path)


def test_delete_oldest_forgets_one_streams_oldest_rows_and_writing_goes_on():
    """The D of the buffer's CRUD: the oldest rows of one stream go (the property tests check it against the
    reference model with every other operation); the other streams keep theirs; later writes fill on."""
    buf = buffer(rows=6, streams=2)
    assert buf.delete_oldest(4, stream=1) == 4 and len(buf) == 8
    assert buf[:]["reward"].tolist() == [0, 1, 2, 3, 4, 5, 4, 5]  # stream 0 whole, then stream 1's newest two
    # Stream 1 now holds no 3-row window: every window sampled starts in stream 0.
    assert set(buf.sample(64, 3).reward[:, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert buf.delete_oldest(100, stream=1) == 2 and buf.delete_oldest(0) == 0
    buf.add([1.0, 1.0, 1.0], [0.0], 9.0, [2.0, 2.0, 2.0], False, False, stream=1)
    assert buf[-1]["reward"] == 9.0 and len(buf) == 7
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        buf.delete_oldest(-1)
    with pytest.raises(IndexError, match="streams 0 .. 1"):
        buf.delete_oldest(1, stream=2)


def test_none_is_refused_rather_than_stored_as_nan_or_false():
    buf = buffer(rows=2)
    with pytest.raises(TypeError, match="reward is None; nothing was written"):
        buf.add([0.0, 0.0, 0.0], [0.0], None, [1.0, 1.0, 1.0], False, False)
    with pytest.raises(TypeError, match="terminated is None"):
        buf.add([0.0, 0.0, 0.0], [0.0], 1.0, [1.0, 1.0, 1.0], None, False)
    assert len(buf) == 2


@pytest.mark.parametrize(
    "obs_dtype, key, hint",
    [
        ("float32", "buffer.capacity", "buffer.obs_dtype=float16"),
        ("float16", "buffer.capacity", None),  # already half size
        ("float32", "trainer.val_steps", None),  # the held-out buffer is float32 whatever buffer.obs_dtype says
    ],
)
def test_a_buffer_larger_than_the_free_memory_is_refused_before_allocating(monkeypatch, obs_dtype, key, hint):
    """An oversized ring would otherwise fail in torch's allocator (naming bytes, not a key) or, where the kernel
    overcommits, be killed mid-run by the OOM killer. The message names the key that set the size."""
    row = 2 * 3 * (4 if obs_dtype == "float32" else 2) + 4 + 4 + 2  # obs and next_obs, action, reward, two flags
    monkeypatch.setattr(worldmodel.ring, "free_memory", lambda device: 10 * row)
    ReplayBuffer(10, obs_dim=3, action_dim=1, obs_dtype=obs_dtype)  # exactly fits
    with pytest.raises(WorldModelError) as err:
        ReplayBuffer(11, obs_dim=3, action_dim=1, obs_dtype=obs_dtype, capacity_key=key)
    message = str(err.value)
    assert f"capacity=11 ({key})" in message and f"rows of {row} bytes" in message
    assert "at most 10 rows would fit" in message
    assert (hint in message) if hint else "obs_dtype" not in message


def test_free_memory_is_known_for_the_host_and_unknown_elsewhere():
    assert 0 < free_memory(torch.device("cpu")) < 2**60
    assert free_memory(torch.device("meta")) is None


@pytest.mark.parametrize("stream, error", [(True, TypeError), (1.0, TypeError), (2, IndexError), (-1, IndexError)])
def test_a_stream_that_is_not_an_integer_in_range_is_refused_by_every_call_and_nothing_is_written(stream, error):
    """numpy reads True as a mask over every stream's pointer and 1.0 as an error of its own; one check for all."""
    buf = buffer(rows=2, streams=2)
    row = dict(obs=[1.0, 1.0, 1.0], action=[0.0], reward=9.0, next_obs=[2.0, 2.0, 2.0], terminated=False,
               truncated=False)  # fmt: skip
    for call in (lambda: buf.add(**row, stream=stream), lambda: buf.delete_oldest(1, stream=stream),
                 lambda: buf.extend(**{k: np.asarray([v]) for k, v in row.items()}, stream=stream)):  # fmt: skip
        with pytest.raises(error, match="stream"):
            call()
    assert buf.ring.sizes.tolist() == [2, 2] and buf.ring.ptrs.tolist() == [2, 2]
    assert buf.delete_oldest(1, stream=np.int64(1)) == 1  # numpy integers are integers


def fake_cgroups(tmp_path, mountinfo: list[str], cgroup: list[str], files: dict[str, str]):
    """A /proc/self and cgroup mounts under tmp_path; `files` maps paths under it to their contents."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text("\n".join(line.format(root=tmp_path) for line in mountinfo) + "\n")
    (proc / "cgroup").write_text("\n".join(cgroup) + "\n")
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return proc


def test_the_memory_cgroup_of_a_slurm_job_or_container_caps_the_free_memory(tmp_path):
    """SLURM's --mem and docker's --memory are cgroup limits: MemAvailable shows the whole node, the OOM killer
    enforces the limit. The smallest room left at any level counts (v2 here: a job inside a capped parent)."""
    proc = fake_cgroups(
        tmp_path,
        ["30 25 0:26 / {root}/cg rw,nosuid - cgroup2 cgroup2 rw"],
        ["0::/slurm/job_7"],
        {"cg/slurm/job_7/memory.max": "17179869184\n", "cg/slurm/job_7/memory.current": "1073741824\n",
         "cg/slurm/memory.max": "8589934592\n", "cg/slurm/memory.current": "8053063680\n",
         "cg/memory.current": "9000000000\n"},  # fmt: skip
    )
    assert cgroup_memory_room(proc) == 8589934592 - 8053063680  # the parent's 0.5 GiB, not the job's 15 GiB


def test_a_memory_cgroup_without_a_limit_leaves_the_machines_figure(tmp_path):
    """cgroup v1 writes "no limit" as a number near 2**63; v2 as max. A container's mount root maps its own path."""
    proc = fake_cgroups(
        tmp_path,
        ["40 25 0:30 /docker/abc {root}/mem rw - cgroup cgroup rw,memory",
         "41 25 0:31 / {root}/cpu rw - cgroup cgroup rw,cpu"],
        ["4:memory:/docker/abc", "3:cpu:/docker/abc"],
        {"mem/memory.limit_in_bytes": "9223372036854771712\n", "mem/memory.usage_in_bytes": "12345\n"},
    )
    assert cgroup_memory_room(proc) is None
    (tmp_path / "mem" / "memory.limit_in_bytes").write_text("4294967296\n")  # docker --memory=4g
    assert cgroup_memory_room(proc) == 4294967296 - 12345


def test_none_truncated_is_refused_too():
    """truncated=None would be stored as False: the episode would silently run on into the next one."""
    buf = buffer(rows=2)
    with pytest.raises(TypeError, match="truncated is None"):
        buf.add([0.0, 0.0, 0.0], [0.0], 1.0, [1.0, 1.0, 1.0], False, None)
    assert len(buf) == 2


def test_newest_rows_skips_empty_streams():
    """One index per stream that holds rows: an empty stream must not add its neighbour's newest (or -1) again."""
    buf = buffer(rows=2, streams=3)
    buf.delete_oldest(2, stream=1)
    assert buf.newest_rows().tolist() == [1, 3]
    buf.delete_oldest(2, stream=0)
    assert buf.newest_rows().tolist() == [1]


def test_an_episode_dataset_loaded_as_a_saved_buffer_is_not_called_truncated(tmp_path):
    """The file is whole, just of the other kind: the error is WrongFile, not the generic 'unreadable or truncated'."""
    from worldmodel.replay import WrongFile

    path = tmp_path / "episodes.npz"
    np.savez(path, obs=np.zeros((2, 3)), lengths=np.ones(1, np.int64))
    with pytest.raises(WrongFile) as err:
        buffer().load(path)
    assert "truncated" not in str(err.value)


def counting_buffer(capacity: int, n: int) -> ReplayBuffer:
    """Row i holds reward i and obs (i, 0)."""
    buf = ReplayBuffer(capacity, obs_dim=2, action_dim=1)
    for i in range(n):
        buf.add(obs=[i, 0], action=[0], reward=i, next_obs=[i + 0.5, 0], terminated=False, truncated=False)
    return buf


@pytest.mark.parametrize("index", [1, -1, np.int64(1), np.array(1), torch.tensor(1)])
def test_a_row_read_by_an_integer_index_is_a_copy(index):
    """torch reads a 0-d index as a view of the table: neither a change to what was read may reach the buffer, nor a
    later write reach what was read."""
    buf = counting_buffer(3, 3)
    row = buf[index]
    before = {k: v.copy() for k, v in row.items()}
    for v in row.values():
        v[...] = 1
    assert buf[index]["reward"] == before["reward"] and buf[index]["obs"].tolist() == before["obs"].tolist()
    row = buf[index]
    buf.update(index, reward=99.0, obs=[7, 7])
    assert row["reward"] == before["reward"] and row["obs"].tolist() == before["obs"].tolist()


def test_rows_listed_by_iteration_do_not_change_when_the_ring_wraps():
    buf = counting_buffer(3, 3)
    rows = list(buf)
    for i in range(3):
        buf.add(obs=[100 + i, 0], action=[0], reward=100 + i, next_obs=[0, 0], terminated=False, truncated=False)
    assert [float(r["reward"]) for r in rows] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint64, torch.int8, torch.int16])
def test_index_arrays_of_any_integer_dtype_read_update_and_gather(dtype):
    """300 rows: more than int8 and uint8 count (numpy 2 casts the row count to the index's dtype)."""
    buf = counting_buffer(300, 300)
    index = torch.tensor([5, 7], dtype=dtype) if isinstance(dtype, torch.dtype) else np.array([5, 7], dtype=dtype)
    assert buf[index]["reward"].tolist() == [5.0, 7.0]
    buf.update(index, reward=-1.0)
    assert buf[[5, 6, 7]]["reward"].tolist() == [-1.0, 6.0, -1.0]
    assert buf.gather(index, 2).reward.tolist() == [[-1.0, 6.0], [-1.0, 8.0]]


def test_an_unsigned_index_past_the_end_is_out_of_range_not_a_wrapped_negative():
    with pytest.raises(IndexError):
        counting_buffer(8, 5)[np.array([2**64 - 1], np.uint64)]
