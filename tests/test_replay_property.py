"""Property tests of ReplayBuffer against a plain-Python model of the same transition stream.

Every transition carries a global step id `sid` in obs[0] (and sid + 0.5 in next_obs[0]). Step ids keep growing across
`clear` and `delete_oldest`, so any window that runs across the write pointer, reaches an overwritten, deleted or
cleared row, or pairs a step with another step's target shows up as a break in the ids. Episode ids live only in the reference and are recomputed from
its own done flags, so `first` is checked against an independent derivation, including after `update` flips a flag.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from worldmodel.errors import NotEnoughDataError
from worldmodel.replay import ReplayBuffer

OBS_DIM, ACTION_DIM = 3, 2
FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")
DTYPES = {
    "obs": torch.float32,
    "action": torch.float32,
    "reward": torch.float32,
    "next_obs": torch.float32,
    "terminated": torch.bool,
    "truncated": torch.bool,
    "first": torch.bool,
}
TRAILING = {"obs": (OBS_DIM,), "action": (ACTION_DIM,), "next_obs": (OBS_DIM,)}

# Mostly "episode continues", so episodes often outlive windows and the ring; every done kind, both at once included.
flags = st.one_of(st.just((False, False)), st.tuples(st.booleans(), st.booleans()))
finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def transition(sid: int, terminated: bool, truncated: bool) -> dict:
    return {
        "obs": np.array([sid, 2 * sid + 1, 0], np.float32),
        "action": np.array([3 * sid, -sid], np.float32),
        "reward": np.float32(sid + 0.25),
        "next_obs": np.array([sid + 0.5, 2 * sid + 1.5, 0], np.float32),
        "terminated": bool(terminated),
        "truncated": bool(truncated),
    }


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
    """Columns of `rows` with the buffer's dtypes; shapes stay right for zero rows."""
    out = {}
    for name in FIELDS:
        dtype = np.bool_ if name in ("terminated", "truncated") else np.float32
        out[name] = np.array([r[name] for r in rows], dtype).reshape(len(rows), *TRAILING.get(name, ()))
    return out


def episode_ids(rows: list[dict]) -> list[int]:
    """A new episode starts after every row with terminated or truncated set."""
    ids, ep = [], 0
    for r in rows:
        ids.append(ep)
        ep += bool(r["terminated"] or r["truncated"])
    return ids


def assert_contents(buf: ReplayBuffer, tail: list[dict]) -> None:
    assert len(buf) == len(tail)
    got, expected = buf[:], stack(tail)
    for name in FIELDS:
        assert got[name].dtype == expected[name].dtype, name
        if not np.array_equal(got[name], expected[name]):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def assert_batches_equal(a, b) -> None:
    for name in DTYPES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def sample_both_ways(buf: ReplayBuffer, batch_size: int, seq_len: int):
    """buf.sample(batch_size, seq_len), once it is checked that sample_rows + batch_at (the gather a graphed update
    records, see cuda_graph.py) give the same batch from the same random state, and leave the same state after."""
    state = buf.rng.bit_generator.state
    batch = buf.sample(batch_size, seq_len)
    after, buf.rng.bit_generator.state = buf.rng.bit_generator.state, state
    rows = buf.sample_rows(batch_size, seq_len)
    assert buf.rng.bit_generator.state == after
    assert rows.dtype == torch.int64 and rows.shape == (batch_size, seq_len)
    gathered = buf.batch_at(rows)
    assert_batches_equal(gathered, batch)
    for name in DTYPES:  # torch.equal ignores dtypes; strides matter to a compiled loss
        got, expected = getattr(gathered, name), getattr(batch, name)
        assert (got.dtype, got.stride()) == (expected.dtype, expected.stride()), name
    return batch


def check_batch(batch, tail: list[dict], tail_eps: list[int], batch_size: int, seq_len: int) -> list[int]:
    """Checks every window of `batch` against the reference tail; returns each window's start position in it."""
    for name, dtype in DTYPES.items():
        t = getattr(batch, name)
        assert t.shape == (batch_size, seq_len, *TRAILING.get(name, ())), name
        assert t.dtype == dtype, name
        assert t.device.type == "cpu", name
    assert len(batch) == batch_size
    arr = {name: getattr(batch, name).numpy() for name in DTYPES}
    expected = stack(tail)
    pos = {int(r["obs"][0]): k for k, r in enumerate(tail)}
    starts = []
    for b in range(batch_size):
        sid = float(arr["obs"][b, 0, 0])
        assert sid.is_integer() and int(sid) in pos, f"window {b} starts at step {sid}, which is not stored"
        s = pos[int(sid)]
        assert s + seq_len <= len(tail), f"window {b} runs past the newest row (start {s}, len {len(tail)})"
        for name in FIELDS:
            want = expected[name][s : s + seq_len]
            if not np.array_equal(arr[name][b], want):  # the cheap test first; hypothesis runs this thousands of times
                np.testing.assert_array_equal(arr[name][b], want, err_msg=f"{name} of window {b} (start {s})")
        # Each step's target is its own next_obs, even at an episode's last step (never the next reset obs).
        np.testing.assert_array_equal(arr["next_obs"][b, :, 0], arr["obs"][b, :, 0] + 0.5)
        eps = tail_eps[s : s + seq_len]
        expected_first = [True] + [eps[j] != eps[j - 1] for j in range(1, seq_len)]
        assert arr["first"][b].tolist() == expected_first, f"window {b}: first {arr['first'][b]} vs episodes {eps}"
        # Never silently joins two episodes: each segment that `first` delimits lies inside one episode.
        seg_starts = [j for j in range(seq_len) if arr["first"][b, j]] + [seq_len]
        for lo, hi in zip(seg_starts, seg_starts[1:]):
            assert len(set(eps[lo:hi])) == 1, f"window {b} joins episodes {eps[lo:hi]} without a `first`"
        starts.append(s)
    return starts


def assert_not_enough(err: NotEnoughDataError, stored: int, needed: int) -> None:
    msg = str(err)
    assert re.search(rf"\b{stored}\b", msg), msg
    assert re.search(rf"\b{needed}\b", msg), msg


def update_a_row(buf: ReplayBuffer, data, rows: list[dict], obs_value) -> None:
    """The `update` rule of the replay state machines (here and in test_replay_streams.py): draws a logical index
    into `rows` (the reference's rows in the buffer's logical order, the same dicts the reference holds) and a field,
    or one reward for several indices at once, and writes it to `buf` and to the reference alike.
    obs_value(row, "obs" | "next_obs") draws a new observation that keeps the ids windows are identified by."""
    n = len(rows)
    i = data.draw(st.integers(-n, n - 1), label="index")
    row = rows[i]
    choice = data.draw(st.sampled_from(["reward", "action", "obs", "next_obs", "done", "array"]), label="field")
    if choice == "reward":
        value = np.float32(data.draw(finite32))
        buf.update(i, reward=value)
        row["reward"] = value
    elif choice == "action":
        value = np.array(data.draw(st.lists(finite32, min_size=buf.action_dim, max_size=buf.action_dim)), np.float32)
        buf.update(i, action=value)
        row["action"] = value
    elif choice in ("obs", "next_obs"):
        value = obs_value(row, choice)
        buf.update(i, **{choice: value})
        row[choice] = value
    elif choice == "done":
        # Flipping done flags moves episode boundaries; `first` must follow since it is derived at sample time.
        term, trunc = data.draw(flags)
        buf.update(i, terminated=term, truncated=trunc)
        row["terminated"], row["truncated"] = term, trunc
    else:
        idx = data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=4), label="indices")
        value = np.float32(data.draw(finite32))
        buf.update(np.array(idx), reward=value)
        for j in idx:
            rows[j]["reward"] = value


class ReplayMachine(RuleBasedStateMachine):
    @initialize(capacity=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
    def setup(self, capacity, seed):
        self.capacity = capacity
        self.buf = ReplayBuffer(capacity, OBS_DIM, ACTION_DIM, seed=seed)
        self.ref: list[dict] = []  # every transition since the last clear
        self.next_sid = 0

    # ---- reference views ------------------------------------------------------------------------------------
    @property
    def tail(self) -> list[dict]:
        return self.ref[-self.capacity :]

    @property
    def tail_eps(self) -> list[int]:
        return episode_ids(self.ref)[-self.capacity :]

    def new_rows(self, fl: list[tuple[bool, bool]]) -> list[dict]:
        rows = [transition(self.next_sid + k, term, trunc) for k, (term, trunc) in enumerate(fl)]
        self.next_sid += len(fl)
        self.ref.extend(rows)
        return rows

    # ---- operations -----------------------------------------------------------------------------------------
    @rule(fl=flags)
    def add(self, fl):
        (r,) = self.new_rows([fl])
        self.buf.add(**r)

    @rule(fl=st.lists(flags, max_size=30))
    def extend(self, fl):
        self.buf.extend(**stack(self.new_rows(fl)))

    @rule()
    def clear(self):
        self.buf.clear()
        self.ref.clear()

    @rule(n=st.integers(0, 14))
    def delete_oldest(self, n):
        kept = self.tail[n:]
        assert self.buf.delete_oldest(n) == len(self.tail) - len(kept)
        self.ref = list(kept)  # the reference holds exactly what is stored

    @precondition(lambda self: len(self.buf) > 0)
    @rule(data=st.data())
    def update(self, data):
        def obs_value(row, choice):
            # Element 0 stays the step id (sid / sid + 0.5): windows are identified by it.
            rest = data.draw(st.lists(finite32, min_size=OBS_DIM - 1, max_size=OBS_DIM - 1))
            return np.array([int(row["obs"][0]) + (0.5 if choice == "next_obs" else 0.0), *rest], np.float32)

        update_a_row(self.buf, data, self.tail, obs_value)

    @rule(batch_size=st.integers(1, 8), seq_len=st.integers(1, 14))
    def sample(self, batch_size, seq_len):
        if len(self.tail) < seq_len:
            with pytest.raises(NotEnoughDataError) as info:
                self.buf.sample(batch_size, seq_len)
            assert_not_enough(info.value, len(self.tail), seq_len)
            with pytest.raises(NotEnoughDataError):
                self.buf.sample_rows(batch_size, seq_len)
        else:
            batch = sample_both_ways(self.buf, batch_size, seq_len)
            check_batch(batch, self.tail, self.tail_eps, batch_size, seq_len)

    @rule(seq_len=st.integers(1, 14), batch_size=st.integers(1, 5))
    def sequences(self, seq_len, batch_size):
        n = len(self.tail)
        if n < seq_len:
            with pytest.raises(NotEnoughDataError) as info:
                list(self.buf.sequences(seq_len, batch_size))
            assert_not_enough(info.value, n, seq_len)
            return
        batches = list(self.buf.sequences(seq_len, batch_size))
        n_windows = n // seq_len
        assert len(batches) == math.ceil(n_windows / batch_size)
        starts = []
        for batch in batches:
            assert 1 <= len(batch) <= batch_size
            starts += check_batch(batch, self.tail, self.tail_eps, len(batch), seq_len)
        # Consecutive, non-overlapping, in order: together they cover rows [0, n_windows * seq_len) exactly once.
        assert starts == list(range(0, n_windows * seq_len, seq_len))

    @rule(
        other_seed=st.integers(0, 2**32 - 1),
        probes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), max_size=3),
    )
    def save_load(self, other_seed, probes):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sub" / "replay.npz"
            self.buf.save(path)
            # A different seed, so matching samples prove the RNG state itself was restored.
            loaded = ReplayBuffer(self.capacity, OBS_DIM, ACTION_DIM, seed=other_seed)
            loaded.load(path)
            assert_contents(loaded, self.tail)
            # The in-memory form that checkpoints embed must round-trip the same way.
            via_state = ReplayBuffer(self.capacity, OBS_DIM, ACTION_DIM, seed=other_seed ^ 1)
            via_state.load_state_dict(self.buf.state_dict())
            assert_contents(via_state, self.tail)

            wrong = ReplayBuffer(self.capacity + 1, OBS_DIM, ACTION_DIM)
            with pytest.raises(ValueError):
                wrong.load(path)

            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            victim = ReplayBuffer(self.capacity, OBS_DIM, ACTION_DIM)
            with pytest.raises(ValueError):
                victim.load(path)
            assert len(victim) == 0
            with pytest.raises(FileNotFoundError):
                victim.load(Path(tmp) / "missing.npz")

        for batch_size, seq_len in probes:
            if seq_len <= len(self.tail):
                expected = self.buf.sample(batch_size, seq_len)
                assert_batches_equal(expected, loaded.sample(batch_size, seq_len))
                assert_batches_equal(expected, via_state.sample(batch_size, seq_len))
        # Carry on with the loaded buffer: later ops then also prove the write pointer was restored.
        self.buf = loaded

    # ---- checked after every step -----------------------------------------------------------------------------
    @invariant()
    def contents_match_reference(self):
        tail = self.tail
        n = len(tail)
        assert len(self.buf) == min(len(self.ref), self.capacity)
        assert_contents(self.buf, tail)
        for i in range(-n, n):
            got = self.buf[i]
            for name in FIELDS:
                assert np.array_equal(got[name], tail[i][name]), (name, i, got[name], tail[i][name])
        for bad in (n, -n - 1):
            with pytest.raises(IndexError):
                self.buf[bad]

    @invariant()
    def sampling_boundary(self):
        n = len(self.tail)
        with pytest.raises(NotEnoughDataError) as info:
            self.buf.sample(2, n + 1)
        assert_not_enough(info.value, n, n + 1)
        if n:
            # Only one window fits: the whole stored tail, oldest first.
            starts = check_batch(self.buf.sample(3, n), self.tail, self.tail_eps, 3, n)
            assert starts == [0, 0, 0]


TestReplayMachine = ReplayMachine.TestCase
TestReplayMachine.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- focused tests ---------------------------------------------------------------------------------------------


def fill(buf: ReplayBuffer, n: int, done_every: int = 0, start: int = 0) -> list[dict]:
    rows = []
    for sid in range(start, start + n):
        end = bool(done_every) and (sid + 1) % done_every == 0
        rows.append(transition(sid, terminated=end and sid % 2 == 0, truncated=end and sid % 2 == 1))
        buf.add(**rows[-1])
    return rows


def test_sampling_reaches_every_valid_start_and_nothing_else():
    capacity, seq_len = 10, 4
    buf = ReplayBuffer(capacity, OBS_DIM, ACTION_DIM, seed=1234)
    rows = fill(buf, 37, done_every=5)  # wrapped 3.7 times: the write pointer sits mid-table
    tail = rows[-capacity:]
    n_starts = capacity - seq_len + 1
    counts = np.zeros(n_starts, int)
    for _ in range(50):
        starts = check_batch(buf.sample(64, seq_len), tail, episode_ids(rows)[-capacity:], 64, seq_len)
        np.add.at(counts, starts, 1)  # check_batch already failed on any start outside [0, n_starts)
    assert (counts > 0).all(), counts
    # Uniform over windows: 3200 draws over 7 starts, ~457 each; a loose band that a fixed seed passes reliably.
    assert counts.min() > 0.75 * counts.mean() and counts.max() < 1.25 * counts.mean(), counts


def test_not_enough_data_message_names_the_counts():
    buf = ReplayBuffer(8, OBS_DIM, ACTION_DIM)
    fill(buf, 3)
    with pytest.raises(NotEnoughDataError) as info:
        buf.sample(4, 7)
    msg = str(info.value)
    assert "3" in msg and "7" in msg, msg
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    with pytest.raises(NotEnoughDataError):
        list(buf.sequences(7, 2))
    with pytest.raises(NotEnoughDataError):
        ReplayBuffer(8, OBS_DIM, ACTION_DIM).sample(1, 1)


def test_episode_end_keeps_final_observation_as_target():
    # One episode ends (terminated) at sid 2 and the next begins with an unrelated reset obs at sid 3.
    buf = ReplayBuffer(6, OBS_DIM, ACTION_DIM, seed=0)
    rows = [transition(0, False, False), transition(1, False, False), transition(2, True, False)]
    rows += [transition(3, False, False), transition(4, False, True), transition(5, True, True)]
    buf.extend(**stack(rows))
    batch = next(buf.sequences(6, 1))
    np.testing.assert_array_equal(batch.next_obs[0, 2].numpy(), rows[2]["next_obs"])
    assert batch.first[0].tolist() == [True, False, False, True, False, True]
    assert batch.terminated[0].tolist() == [False, False, True, False, False, True]
    assert batch.truncated[0].tolist() == [False, False, False, False, True, True]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9])
def test_load_rejects_truncated_file_and_leaves_buffer_untouched(tmp_path, fraction):
    src = ReplayBuffer(5, OBS_DIM, ACTION_DIM, seed=3)
    fill(src, 8, done_every=3)
    path = tmp_path / "replay.npz"
    src.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])

    dst = ReplayBuffer(5, OBS_DIM, ACTION_DIM, seed=9)
    before = fill(dst, 4, start=100)
    state = dst.rng.bit_generator.state
    with pytest.raises(ValueError):
        dst.load(path)
    assert_contents(dst, before)
    assert dst.rng.bit_generator.state == state


def test_load_rejects_mismatched_shape_and_missing_file(tmp_path):
    src = ReplayBuffer(5, OBS_DIM, ACTION_DIM)
    fill(src, 2)
    path = tmp_path / "replay.npz"
    src.save(path)
    for cap, od, ad in [(4, OBS_DIM, ACTION_DIM), (6, OBS_DIM, ACTION_DIM), (5, OBS_DIM + 1, ACTION_DIM),
                        (5, OBS_DIM, ACTION_DIM + 1)]:
        with pytest.raises(ValueError):
            ReplayBuffer(cap, od, ad).load(path)
    with pytest.raises(FileNotFoundError):
        ReplayBuffer(5, OBS_DIM, ACTION_DIM).load(tmp_path / "nope.npz")


@pytest.mark.parametrize("before, after", [(3, 1), (5, 2), (6, 0), (13, 4)])
def test_save_load_after_clear_and_partial_refill(tmp_path, before, after):
    # clear() with the write pointer mid-table, then fewer rows than capacity: save must still pick the stored rows.
    buf = ReplayBuffer(6, OBS_DIM, ACTION_DIM, seed=5)
    fill(buf, before, done_every=2)
    buf.clear()
    rows = fill(buf, after, start=1000)
    buf.save(tmp_path / "r.npz")
    loaded = ReplayBuffer(6, OBS_DIM, ACTION_DIM)
    loaded.load(tmp_path / "r.npz")
    assert_contents(loaded, rows)
    more = fill(loaded, 3, start=2000)
    assert_contents(loaded, (rows + more)[-6:])


def test_state_dict_is_a_snapshot():
    # A checkpoint holds the state_dict while training goes on writing the buffer: later writes must not leak in.
    buf = ReplayBuffer(5, OBS_DIM, ACTION_DIM, seed=2)
    rows = fill(buf, 7, done_every=3)
    state = buf.state_dict()
    fill(buf, 4, start=100)
    buf.update(0, reward=-1.0)
    buf.sample(3, 2)
    restored = ReplayBuffer(5, OBS_DIM, ACTION_DIM, seed=8)
    restored.load_state_dict(state)
    assert_contents(restored, rows[-5:])
    again = ReplayBuffer(5, OBS_DIM, ACTION_DIM, seed=2)
    fill(again, 7, done_every=3)
    assert_batches_equal(again.sample(4, 3), restored.sample(4, 3))


def test_save_load_round_trip_continues_identically(tmp_path):
    a = ReplayBuffer(7, OBS_DIM, ACTION_DIM, seed=11)
    fill(a, 19, done_every=4)
    a.sample(5, 3)  # advance the RNG so the saved state is not just the seed's
    a.save(tmp_path / "r.npz")
    b = ReplayBuffer(7, OBS_DIM, ACTION_DIM, seed=999)
    b.load(tmp_path / "r.npz")
    for _ in range(3):
        assert_batches_equal(a.sample(6, 4), b.sample(6, 4))
    # Same write pointer: identical after further appends that wrap again.
    fill(a, 9, start=500)
    fill(b, 9, start=500)
    assert_contents(b, [transition(s, False, False) for s in range(500, 509)][-7:])
    for name in FIELDS:
        np.testing.assert_array_equal(a[:][name], b[:][name])
    assert_batches_equal(a.sample(6, 7), b.sample(6, 7))
