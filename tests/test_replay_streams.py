"""Property tests of a multi-stream ReplayBuffer (one stream per parallel env) against a plain-Python reference.

Every transition carries its stream id in obs[1] / next_obs[1] and a per-stream step id `sid` in obs[0] (sid + 0.5 in
next_obs[0]). Step ids keep growing across `clear`, so a window that mixes two streams, runs across a stream's write
pointer or past its newest row, reaches an overwritten, cleared or skipped (invalid) row, or pairs a step with another
step's target shows up as a wrong stream id or a break in the ids. Rows that `extend_streams` must skip carry a
garbage stream id (-1), so storing one is caught too.

The reference keeps, per stream, every row written since the last clear; a stream of capacity `seg` holds the last
`seg` of them, and the buffer's logical order is stream-major (stream 0 oldest..newest, then stream 1, ...).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from test_replay_property import sample_both_ways, update_a_row
from worldmodel.errors import NotEnoughDataError
from worldmodel.replay import ReplayBuffer

OBS_DIM, ACTION_DIM = 3, 2
FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")
BATCH_DTYPES = {
    "obs": torch.float32,  # always float32, whatever the storage dtype
    "action": torch.float32,
    "reward": torch.float32,
    "next_obs": torch.float32,
    "terminated": torch.bool,
    "truncated": torch.bool,
    "first": torch.bool,
}
TRAILING = {"obs": (OBS_DIM,), "action": (ACTION_DIM,), "next_obs": (OBS_DIM,)}
STORE = {"float32": np.float32, "float16": np.float16}

# Mostly "episode continues"; every done kind, both at once included.
flags = st.one_of(st.just((False, False)), st.tuples(st.booleans(), st.booleans()))
finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
# Values float16 holds exactly, so obs updates survive float16 storage unchanged and the reference need not round.
finite16 = st.floats(-6e4, 6e4, allow_nan=False, allow_infinity=False, width=16)


def transition(stream: int, sid: int, terminated: bool = False, truncated: bool = False) -> dict:
    # Every value is exact in float16 for sid < 1024 (the state machine stays far below).
    return {
        "obs": np.array([sid, stream, -sid], np.float32),
        "action": np.array([3 * sid + 0.125, stream], np.float32),
        "reward": np.float32(sid + 0.25),
        "next_obs": np.array([sid + 0.5, stream, -sid - 0.5], np.float32),
        "terminated": bool(terminated),
        "truncated": bool(truncated),
    }


GARBAGE = transition(-1, 999, True, True)  # what extend_streams gets at positions where valid is False

def stack(rows: list[dict], obs_dtype=np.float32) -> dict[str, np.ndarray]:
    """Columns of `rows` with the buffer's dtypes (obs and next_obs in `obs_dtype`); right shapes for zero rows."""
    out = {}
    for name in FIELDS:
        dtype = np.bool_ if name in ("terminated", "truncated") else np.float32
        out[name] = np.array([r[name] for r in rows], dtype).reshape(len(rows), *TRAILING.get(name, ()))
    out["obs"], out["next_obs"] = out["obs"].astype(obs_dtype), out["next_obs"].astype(obs_dtype)
    return out


def block(rows: list[list[dict]]) -> dict[str, np.ndarray]:
    """[T][N] rows -> arrays shaped [T, N, ...] for extend_streams."""
    t, n = len(rows), len(rows[0]) if rows else 0
    flat = stack([r for step in rows for r in step])
    return {k: v.reshape(t, n, *v.shape[1:]) for k, v in flat.items()}


def one_stream(buf: ReplayBuffer, k: int, rows: list[dict]) -> None:
    """Appends `rows` to stream k alone, through extend_streams with a one-hot mask (the path a vectorized collector
    takes), to compare against add/extend(stream=k)."""
    valid = np.zeros((len(rows), buf.streams), bool)
    valid[:, k] = True
    arrays = stack(rows)
    buf.extend_streams(valid, **{name: np.repeat(v[:, None], buf.streams, axis=1) for name, v in arrays.items()})


def assert_contents(buf: ReplayBuffer, tail: list[dict], obs_dtype=np.float32) -> None:
    assert len(buf) == len(tail)
    got, expected = buf[:], stack(tail, obs_dtype)
    for name in FIELDS:
        assert got[name].dtype == expected[name].dtype, name
        if not np.array_equal(got[name], expected[name]):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def assert_batches_equal(a, b) -> None:
    for name in BATCH_DTYPES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def check_batch(batch, tails: list[list[dict]], batch_size: int, seq_len: int) -> list[tuple[int, int]]:
    """Checks every window of `batch` against the per-stream reference tails; returns each window's (stream, start
    position in that stream's tail)."""
    for name, dtype in BATCH_DTYPES.items():
        t = getattr(batch, name)
        assert t.shape == (batch_size, seq_len, *TRAILING.get(name, ())), name
        assert t.dtype == dtype, name
    assert len(batch) == batch_size
    arr = {name: getattr(batch, name).numpy() for name in BATCH_DTYPES}
    pos = [{int(r["obs"][0]): j for j, r in enumerate(tail)} for tail in tails]
    found = []
    for b in range(batch_size):
        # Never mixes streams: every row of the window carries the same stream id.
        ids = arr["obs"][b, :, 1]
        assert (ids == ids[0]).all(), f"window {b} mixes streams {ids.tolist()}"
        k, sid = float(ids[0]), float(arr["obs"][b, 0, 0])
        assert k.is_integer() and 0 <= k < len(tails), f"window {b} starts in stream {k}, which does not exist"
        k = int(k)
        assert sid.is_integer() and int(sid) in pos[k], f"window {b} starts at step {sid} of stream {k}: not stored"
        s = pos[k][int(sid)]
        tail = tails[k]
        assert s + seq_len <= len(tail), f"window {b} runs past stream {k}'s newest row (start {s}, len {len(tail)})"
        expected = stack(tail[s : s + seq_len])
        for name in FIELDS:
            if not np.array_equal(arr[name][b], expected[name]):  # the cheap test first
                np.testing.assert_array_equal(arr[name][b], expected[name], err_msg=f"{name} of window {b} ({k}, {s})")
        # Each step's target is its own next_obs.
        np.testing.assert_array_equal(arr["next_obs"][b, :, 0], arr["obs"][b, :, 0] + 0.5)
        done = [bool(r["terminated"] or r["truncated"]) for r in tail[s : s + seq_len]]
        assert arr["first"][b].tolist() == [True] + done[:-1], f"window {b}: first {arr['first'][b]} vs done {done}"
        found.append((k, s))
    return found


class StreamsMachine(RuleBasedStateMachine):
    @initialize(
        streams=st.integers(1, 4),
        seg=st.integers(1, 6),
        spare=st.integers(0, 3),
        obs_dtype=st.sampled_from(["float32", "float16"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, streams, seg, spare, obs_dtype, seed):
        self.n, self.seg, self.obs_dtype = streams, seg, obs_dtype
        # Capacity is often not a multiple of streams: the remainder (< streams) must go unused.
        self.capacity = seg * streams + spare % streams
        self.buf = ReplayBuffer(self.capacity, OBS_DIM, ACTION_DIM, streams=streams, seed=seed, obs_dtype=obs_dtype)
        assert self.buf.streams == streams and self.buf.capacity == seg * streams
        self.ref: list[list[dict]] = [[] for _ in range(streams)]  # per stream, every row since the last clear
        self.next_sid = [0] * streams  # never reset, so stale rows are told apart from new ones

    # ---- reference views ------------------------------------------------------------------------------------
    @property
    def tails(self) -> list[list[dict]]:
        return [rows[-self.seg :] for rows in self.ref]

    @property
    def flat(self) -> list[dict]:
        """The reference rows in the buffer's logical order (the same dicts, so mutating one updates the ref)."""
        return [r for tail in self.tails for r in tail]

    def new_row(self, k: int, fl: tuple[bool, bool]) -> dict:
        row = transition(k, self.next_sid[k], *fl)
        self.next_sid[k] += 1
        assert self.next_sid[k] < 1024  # keeps sid + 0.5 exact in float16
        self.ref[k].append(row)
        return row

    def draw_stream(self, data) -> int:
        return data.draw(st.integers(0, self.n - 1), label="stream")

    # ---- writes ---------------------------------------------------------------------------------------------
    @rule(data=st.data())
    def extend_streams(self, data):
        t = data.draw(st.integers(0, 8), label="T")
        valid = data.draw(st.lists(st.lists(st.booleans(), min_size=self.n, max_size=self.n), min_size=t,
                                   max_size=t), label="valid")  # fmt: skip
        fl = data.draw(st.lists(st.lists(flags, min_size=self.n, max_size=self.n), min_size=t, max_size=t),
                       label="flags")  # fmt: skip
        # Time order within each stream: step t's row comes before step t+1's.
        rows = [[self.new_row(k, fl[i][k]) if valid[i][k] else GARBAGE for k in range(self.n)] for i in range(t)]
        arrays = block(rows) if t else {k: v.reshape(0, self.n, *v.shape[1:]) for k, v in stack([]).items()}
        self.buf.extend_streams(np.array(valid, bool).reshape(t, self.n), **arrays)

    @rule(data=st.data(), fl=flags)
    def add(self, data, fl):
        k = self.draw_stream(data)
        row = self.new_row(k, fl)
        self.buf.add(**row, stream=k)

    @rule(data=st.data(), fl=st.lists(flags, max_size=8))
    def extend(self, data, fl):
        k = self.draw_stream(data)
        rows = [self.new_row(k, f) for f in fl]
        self.buf.extend(**stack(rows), stream=k)

    @rule()
    def clear(self):
        self.buf.clear()
        for rows in self.ref:
            rows.clear()

    @precondition(lambda self: len(self.buf) > 0)
    @rule(data=st.data())
    def update(self, data):
        def obs_value(row, choice):
            # Elements 0 and 1 stay (step id, stream id): windows are identified by them.
            sid, k = int(row["obs"][0]), int(row["obs"][1])
            return np.array([sid + (0.5 if choice == "next_obs" else 0.0), k, data.draw(finite16)], np.float32)

        update_a_row(self.buf, data, self.flat, obs_value)

    # ---- reads ----------------------------------------------------------------------------------------------
    @rule(batch_size=st.integers(1, 6), seq_len=st.integers(1, 7))
    def sample(self, batch_size, seq_len):
        tails = self.tails
        if max(map(len, tails)) < seq_len:  # no stream holds a window, however many rows all streams hold together
            with pytest.raises(NotEnoughDataError):
                self.buf.sample(batch_size, seq_len)
            with pytest.raises(NotEnoughDataError):
                self.buf.sample_rows(batch_size, seq_len)
        else:
            check_batch(sample_both_ways(self.buf, batch_size, seq_len), tails, batch_size, seq_len)

    @rule(seq_len=st.integers(1, 7), batch_size=st.integers(1, 5))
    def sequences(self, seq_len, batch_size):
        tails = self.tails
        if max(map(len, tails)) < seq_len:
            with pytest.raises(NotEnoughDataError):
                list(self.buf.sequences(seq_len, batch_size))
            return
        # Each stream cut into consecutive non-overlapping windows (its short tail dropped), streams in order.
        expected = [(k, s) for k, tail in enumerate(tails) for s in range(0, len(tail) - seq_len + 1, seq_len)]
        batches = list(self.buf.sequences(seq_len, batch_size))
        assert len(batches) == math.ceil(len(expected) / batch_size)
        found = []
        for batch in batches:
            assert 1 <= len(batch) <= batch_size
            found += check_batch(batch, tails, len(batch), seq_len)
        assert found == expected

    @precondition(lambda self: len(self.buf) > 0)
    @rule(data=st.data(), seq_len=st.integers(1, 6))
    def gather(self, data, seq_len):
        tails = self.tails
        begins = np.cumsum([0] + [len(t) for t in tails])
        good = [(k, s) for k, tail in enumerate(tails) for s in range(len(tail) - seq_len + 1)]
        bad = [int(begins[k] + s) for k, tail in enumerate(tails) for s in range(len(tail)) if s + seq_len > len(tail)]
        if good:
            picks = data.draw(st.lists(st.sampled_from(good), min_size=1, max_size=5), label="starts")
            starts = np.array([begins[k] + s for k, s in picks])
            assert check_batch(self.buf.gather(starts, seq_len), tails, len(picks), seq_len) == picks
        if bad:
            # A window that would run past its stream's newest row (into the next stream's rows) is refused.
            start = data.draw(st.sampled_from(bad), label="bad start")
            with pytest.raises(IndexError):
                self.buf.gather(np.array([start]), seq_len)

    # ---- persistence ----------------------------------------------------------------------------------------
    @rule(
        other_seed=st.integers(0, 2**32 - 1),
        probes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), max_size=3),
        carry_on_tables=st.booleans(),
    )
    def save_load(self, other_seed, probes, carry_on_tables):
        make = lambda **kw: ReplayBuffer(  # noqa: E731
            **{"capacity": self.capacity, "obs_dim": OBS_DIM, "action_dim": ACTION_DIM, "streams": self.n,
               "obs_dtype": self.obs_dtype, "seed": other_seed, **kw})  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "replay.npz"
            self.buf.save(path)
            # A different seed, so matching samples prove the RNG state itself was restored.
            loaded = make()
            loaded.load(path)
            via_state = make(seed=other_seed ^ 1)
            via_state.load_state_dict(self.buf.state_dict())
            # What a checkpoint holds: the ring's own tables, saved as they are and mapped back from the file.
            torch.save(self.buf.state_dict(copy=False), Path(tmp) / "state.pt")
            as_tables = make(seed=other_seed ^ 2)
            as_tables.load_state_dict(torch.load(Path(tmp) / "state.pt", mmap=True, weights_only=True))
            np.testing.assert_array_equal(as_tables.ring.ptrs, self.buf.ring.ptrs)  # the same physical layout
            for other in (loaded, via_state, as_tables):
                assert_contents(other, self.flat, STORE[self.obs_dtype])
                np.testing.assert_array_equal(other.ring.sizes, [len(t) for t in self.tails])
            # Another shape of buffer refuses the file and the state.
            wrong = [
                make(capacity=(self.seg + 1) * self.n),
                make(obs_dtype="float16" if self.obs_dtype == "float32" else "float32"),
                make(streams=self.n + 1, capacity=self.seg * (self.n + 1)),
            ]
            if self.n > 1:
                wrong.append(make(streams=1, capacity=self.seg * self.n))  # same capacity, streams differ
            for other in wrong:
                with pytest.raises(ValueError):
                    other.load(path)
                with pytest.raises(ValueError):
                    other.load_state_dict(self.buf.state_dict())
                with pytest.raises(ValueError):
                    other.load_state_dict(self.buf.state_dict(copy=False))

        for batch_size, seq_len in probes:
            if seq_len <= max(map(len, self.tails)):
                expected = self.buf.sample(batch_size, seq_len)
                assert_batches_equal(expected, loaded.sample(batch_size, seq_len))
                assert_batches_equal(expected, via_state.sample(batch_size, seq_len))
                assert_batches_equal(expected, as_tables.sample(batch_size, seq_len))
        # Carry on with a loaded buffer: later writes then also prove the per-stream pointers were restored.
        self.buf = as_tables if carry_on_tables else loaded

    # ---- checked after every step -----------------------------------------------------------------------------
    @invariant()
    def contents_match_reference(self):
        flat = self.flat
        n = len(flat)
        assert len(self.buf) == n == sum(min(len(rows), self.seg) for rows in self.ref)
        assert_contents(self.buf, flat, STORE[self.obs_dtype])
        for i in range(-n, n):
            got = self.buf[i]
            for name in FIELDS:
                want = np.asarray(flat[i][name]).astype(got[name].dtype)
                assert np.array_equal(got[name], want), (name, i, got[name], flat[i][name])
        for bad in (n, -n - 1):
            with pytest.raises(IndexError):
                self.buf[bad]

    @invariant()
    def sampling_boundary(self):
        tails = self.tails
        longest = max(map(len, tails))
        with pytest.raises(NotEnoughDataError):
            self.buf.sample(2, longest + 1)
        if longest:
            # Only the whole tails of the longest streams fit, and each of them is drawn from.
            found = check_batch(self.buf.sample(8, longest), tails, 8, longest)
            assert {s for _, s in found} == {0}
            assert {k for k, _ in found} <= {k for k, t in enumerate(tails) if len(t) == longest}


TestStreamsMachine = StreamsMachine.TestCase
TestStreamsMachine.settings = settings(
    max_examples=120,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---- focused tests ---------------------------------------------------------------------------------------------


def fill_streams(buf: ReplayBuffer, counts: list[int], done_every: int = 0) -> list[list[dict]]:
    """Writes counts[k] rows to stream k through extend_streams, interleaved with invalid steps; returns every row
    written per stream."""
    n = len(counts)
    written: list[list[dict]] = [[] for _ in range(n)]
    rows, valid = [], []
    for t in range(2 * max(counts)):
        step, mask = [], []
        for k in range(n):
            ok = t % 2 == k % 2 and len(written[k]) < counts[k]  # streams alternate steps: invalid rows between
            if ok:
                sid = len(written[k])
                end = bool(done_every) and (sid + 1) % done_every == 0
                written[k].append(transition(k, sid, terminated=end and sid % 2 == 0, truncated=end and sid % 2 == 1))
            step.append(written[k][-1] if ok else GARBAGE)
            mask.append(ok)
        rows.append(step)
        valid.append(mask)
    buf.extend_streams(np.array(valid), **block(rows))
    assert [len(w) for w in written] == counts
    return written


def test_sampling_is_uniform_over_windows_of_unequal_streams():
    seg, seq_len = 8, 3
    buf = ReplayBuffer(3 * seg, OBS_DIM, ACTION_DIM, streams=3, seed=1234)
    # Stream 0 wrapped (pointer mid-segment): 6 windows; stream 1: 3 windows; stream 2 too short for any.
    written = fill_streams(buf, [19, 5, 2], done_every=4)
    tails = [w[-seg:] for w in written]
    counts: dict[tuple[int, int], int] = {}
    for _ in range(50):
        for key in check_batch(buf.sample(64, seq_len), tails, 64, seq_len):
            counts[key] = counts.get(key, 0) + 1
    windows = [(0, s) for s in range(6)] + [(1, s) for s in range(3)]
    assert sorted(counts) == windows, sorted(counts)
    # Uniform over windows, not over streams: 3200 draws over 9 windows, ~356 each (per-stream-then-start would give
    # stream 1's windows ~533 and stream 0's ~267). A loose band that the fixed seed passes reliably.
    c = np.array(list(counts.values()))
    assert c.min() > 0.75 * c.mean() and c.max() < 1.25 * c.mean(), counts


@pytest.mark.parametrize("counts", [[7, 3, 0, 5], [3, 9, 1, 6], [0, 0, 6, 2], [20, 1, 14, 6]])
def test_windows_never_mix_streams(counts):
    seg = 6
    buf = ReplayBuffer(4 * seg + 3, OBS_DIM, ACTION_DIM, streams=4, seed=7)
    written = fill_streams(buf, counts, done_every=3)
    tails = [w[-seg:] for w in written]
    sizes = [len(t) for t in tails]
    begins = np.cumsum([0] + sizes)
    assert len(buf) == sum(sizes)
    for seq_len in range(1, seg + 1):
        good = [(k, s) for k in range(4) for s in range(sizes[k] - seq_len + 1)]
        if not good:
            with pytest.raises(NotEnoughDataError):
                buf.sample(4, seq_len)
            continue
        # Every window that fits, at once, through gather; then through sample and sequences.
        starts = np.array([begins[k] + s for k, s in good])
        assert check_batch(buf.gather(starts, seq_len), tails, len(good), seq_len) == good
        assert set(check_batch(buf.sample(200, seq_len), tails, 200, seq_len)) <= set(good)
        for batch in buf.sequences(seq_len, 3):
            check_batch(batch, tails, len(batch), seq_len)
        # A start whose window would run into the next stream's rows is refused.
        for k in range(4):
            for s in range(max(0, sizes[k] - seq_len + 1), sizes[k]):
                with pytest.raises(IndexError):
                    buf.gather(np.array([begins[k] + s]), seq_len)


def test_extend_streams_keeps_only_each_streams_newest_rows():
    buf = ReplayBuffer(6, OBS_DIM, ACTION_DIM, streams=2)
    # 5 valid rows for stream 0 (holds 3), 2 for stream 1 with an invalid step between them.
    valid = np.array([[1, 1], [1, 0], [1, 1], [1, 0], [1, 0]], bool)
    rows = [[transition(k, t) if valid[t, k] else GARBAGE for k in range(2)] for t in range(5)]
    buf.extend_streams(valid, **block(rows))
    assert_contents(buf, [transition(0, t) for t in (2, 3, 4)] + [transition(1, t) for t in (0, 2)])
    # The pointers continue from there: stream 0 overwrites its oldest, stream 1 fills its last slot.
    one_stream(buf, 0, [transition(0, 5)])
    one_stream(buf, 1, [transition(1, 3), transition(1, 4)])
    assert_contents(buf, [transition(0, t) for t in (3, 4, 5)] + [transition(1, t) for t in (2, 3, 4)])
    # An all-invalid block and an empty one write nothing.
    buf.extend_streams(np.zeros((2, 2), bool), **block([[GARBAGE, GARBAGE]] * 2))
    buf.extend_streams(np.zeros((0, 2), bool), **{k: v.reshape(0, 2, *v.shape[1:]) for k, v in stack([]).items()})
    assert_contents(buf, [transition(0, t) for t in (3, 4, 5)] + [transition(1, t) for t in (2, 3, 4)])
    # A column laid out [streams, T] instead of [T, streams] is refused, not reshaped into the wrong rows.
    arrays = block([[transition(0, 6), transition(1, 5)]] * 3)
    arrays["obs"] = arrays["obs"].swapaxes(0, 1)
    with pytest.raises(ValueError, match="obs"):
        buf.extend_streams(np.ones((3, 2), bool), **arrays)
    assert_contents(buf, [transition(0, t) for t in (3, 4, 5)] + [transition(1, t) for t in (2, 3, 4)])


@pytest.mark.parametrize("obs_dtype", ["float16", "bfloat16"])
def test_low_precision_obs_storage_round_trip(tmp_path, obs_dtype):
    store = {"float16": torch.float16, "bfloat16": torch.bfloat16}[obs_dtype]
    rng = np.random.default_rng(0)
    t, n = 6, 2
    values = {
        "obs": rng.normal(0, 10, (t, n, OBS_DIM)).astype(np.float32),
        "action": rng.normal(0, 1, (t, n, ACTION_DIM)).astype(np.float32),
        "reward": rng.normal(0, 1, (t, n)).astype(np.float32),
        "next_obs": rng.normal(0, 10, (t, n, OBS_DIM)).astype(np.float32),
        "terminated": rng.random((t, n)) < 0.3,
        "truncated": rng.random((t, n)) < 0.3,
    }
    rounded = {k: torch.from_numpy(values[k]).to(store).float().numpy() for k in ("obs", "next_obs")}
    # The rounding is real (else this test could not tell float16 storage from float32).
    assert not np.array_equal(rounded["obs"], values["obs"])
    buf = ReplayBuffer(2 * t, OBS_DIM, ACTION_DIM, streams=n, seed=3, obs_dtype=obs_dtype)
    buf.extend_streams(np.ones((t, n), bool), **values)
    assert buf.ring.columns["obs"].dtype == store and buf.ring.columns["next_obs"].dtype == store
    assert buf.ring.columns["action"].dtype == torch.float32 and buf.ring.columns["reward"].dtype == torch.float32

    def expected(name, k):  # stream k's rows of column `name` as they should come back, as float32 / bool
        return (rounded if name in rounded else values)[name][:, k]

    def check(b):
        got = b[:]
        for name in FIELDS:
            want = np.concatenate([expected(name, k) for k in range(n)])
            np.testing.assert_array_equal(got[name].astype(want.dtype), want, err_msg=name)
        batch = next(b.sequences(t, n))
        for name in FIELDS:
            t_ = getattr(batch, name)
            assert t_.dtype == BATCH_DTYPES[name], name
            np.testing.assert_array_equal(t_.numpy(), np.stack([expected(name, k) for k in range(n)]), err_msg=name)
        sample = b.sample(5, 4)
        assert sample.obs.dtype == torch.float32 and sample.next_obs.dtype == torch.float32

    buf.save(tmp_path / "r.npz")
    loaded = ReplayBuffer(2 * t, OBS_DIM, ACTION_DIM, streams=n, seed=99, obs_dtype=obs_dtype)
    loaded.load(tmp_path / "r.npz")
    check(buf)
    check(loaded)  # draws as many samples as check(buf) did, so both RNGs stay in step
    assert_batches_equal(buf.sample(4, 3), loaded.sample(4, 3))
    with pytest.raises(ValueError):  # a float32 buffer refuses low-precision contents
        ReplayBuffer(2 * t, OBS_DIM, ACTION_DIM, streams=n).load(tmp_path / "r.npz")


@pytest.mark.parametrize("theirs", [(8, 4), (8, 1), (9, 3), (6, 2)])
def test_load_refuses_a_different_stream_layout(tmp_path, theirs):
    src = ReplayBuffer(8, OBS_DIM, ACTION_DIM, streams=2, seed=1)
    fill_streams(src, [3, 4])
    src.save(tmp_path / "r.npz")
    capacity, streams = theirs
    dst = ReplayBuffer(capacity, OBS_DIM, ACTION_DIM, streams=streams, seed=5)
    before = fill_streams(dst, [1] * streams)
    rng_state = dst.rng.bit_generator.state
    with pytest.raises(ValueError):
        dst.load(tmp_path / "r.npz")
    with pytest.raises(ValueError):
        dst.load_state_dict(src.state_dict())
    # Refused before anything is written.
    assert_contents(dst, [r for rows in before for r in rows])
    assert dst.rng.bit_generator.state == rng_state


def test_capacity_not_divisible_by_streams():
    buf = ReplayBuffer(11, OBS_DIM, ACTION_DIM, streams=3, seed=0)
    assert buf.capacity == 9 and buf.streams == 3  # 3 rows per stream, the remainder of 2 unused
    written = fill_streams(buf, [5, 2, 4])
    tails = [w[-3:] for w in written]
    assert_contents(buf, [r for t in tails for r in t])
    # Fill every stream past its capacity: never more than 3 rows per stream, 9 in all.
    for k in range(3):
        one_stream(buf, k, [transition(k, 100 + i) for i in range(7)])
    assert len(buf) == 9
    assert_contents(buf, [transition(k, 100 + i) for k in range(3) for i in range(4, 7)])
    with pytest.raises(NotEnoughDataError):
        buf.sample(1, 4)  # 9 rows in all, but no stream holds 4
    with pytest.raises(ValueError):
        ReplayBuffer(2, OBS_DIM, ACTION_DIM, streams=3)  # fewer rows than streams


def test_state_dict_round_trip_continues_identically():
    a = ReplayBuffer(15, OBS_DIM, ACTION_DIM, streams=3, seed=11)
    fill_streams(a, [12, 3, 7], done_every=4)
    a.sample(5, 2)  # advance the RNG so the saved state is not just the seed's
    b = ReplayBuffer(15, OBS_DIM, ACTION_DIM, streams=3, seed=999)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert_batches_equal(a.sample(6, 3), b.sample(6, 3))
    # The physical layout differs (b's rows start at each segment's beginning); further writes must not show it.
    more = [[transition(k, 200 + t) for k in range(3)] for t in range(4)]
    valid = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]], bool)
    for buf in (a, b):
        buf.extend_streams(valid, **block(more))
        one_stream(buf, 1, [transition(1, 300)])
    for name in FIELDS:
        np.testing.assert_array_equal(a[:][name], b[:][name], err_msg=name)
    assert_batches_equal(a.sample(8, 4), b.sample(8, 4))
    assert_batches_equal(next(a.sequences(2, 100)), next(b.sequences(2, 100)))


@pytest.mark.parametrize("streams", [2, 3])
def test_add_and_extend_to_one_of_several_streams(streams):
    buf = ReplayBuffer(4 * streams, OBS_DIM, ACTION_DIM, streams=streams, seed=0)
    ref: list[list[dict]] = [[] for _ in range(streams)]
    for sid in range(6):  # past capacity: each stream wraps
        for k in reversed(range(streams)):
            ref[k].append(transition(k, 2 * sid))
            buf.add(**ref[k][-1], stream=k)
            rows = [transition(k, 2 * sid + 1)] * (sid % 2)  # empty extends too
            ref[k] += rows
            buf.extend(**stack(rows), stream=k)
    assert_contents(buf, [r for rows in ref for r in rows[-4:]])
    via_streams = ReplayBuffer(4 * streams, OBS_DIM, ACTION_DIM, streams=streams, seed=0)
    for k in range(streams):
        one_stream(via_streams, k, ref[k])
    assert_batches_equal(buf.sample(16, 3), via_streams.sample(16, 3))


def test_a_write_refused_for_one_column_changes_no_row():
    """Every column is checked before any is written: a wrong trailing shape in the last column must not leave the
    earlier columns' new values paired with the old rows' other fields."""
    buf = ReplayBuffer(4, 2, 1)
    for t in range(4):
        buf.add([t, t], [0.0], float(t), [t + 1, t + 1], False, False)
    before = buf[:]
    good = {"obs": np.full((2, 2), 99.0), "action": np.zeros((2, 1)), "reward": np.zeros(2),
            "next_obs": np.zeros((2, 2)), "terminated": np.zeros(2, bool), "truncated": np.zeros(2, bool)}  # fmt: skip
    with pytest.raises(ValueError, match="reward"):
        buf.extend(**{**good, "reward": np.zeros((2, 1))})
    with pytest.raises(ValueError, match="obs"):
        buf.update(2, reward=5.0, obs=np.zeros(3))
    block = {k: v[:, None] for k, v in good.items()}  # [T=2, streams=1, ...]
    with pytest.raises(ValueError, match="truncated"):
        buf.extend_streams(np.ones((2, 1), bool), **{**block, "truncated": np.zeros((2, 1, 3), bool)})
    for name, values in buf[:].items():
        np.testing.assert_array_equal(values, before[name], err_msg=name)
    assert len(buf) == 4 and buf.ring.ptr == 0


@pytest.mark.parametrize("write", ["extend", "extend_streams", "update"])
def test_float64_values_round_once_to_float16_storage(write):
    """numpy rounds float64 straight to float16; torch goes through float32 and can round twice. Every write path
    must store what numpy's single rounding gives."""
    value = 1 + 2**-11 + 2**-40  # just above a float16 tie: float32 drops the 2**-40 and the tie rounds down
    assert np.float16(value) != np.float16(np.float32(value))
    buf = ReplayBuffer(4, 1, 1, obs_dtype="float16")

    def rows(*obs):
        n, obs = len(obs), np.array(obs, dtype=np.float64)[:, None]
        return {"obs": obs, "action": np.zeros((n, 1)), "reward": np.zeros(n), "next_obs": obs,
                "terminated": np.zeros(n, bool), "truncated": np.zeros(n, bool)}  # fmt: skip

    if write == "extend":
        buf.extend(**rows(value, 0.0))  # rows 0-1: a slice (written through numpy)
        buf.extend(**rows(0.0, 0.0, value, 0.0))  # fills 2-3, then wraps to 0-1: scattered rows (through torch)
    elif write == "extend_streams":
        buf.extend_streams(np.ones((2, 1), bool), **{k: v[:, None] for k, v in rows(value, 0.0).items()})
    else:
        buf.extend(**rows(0.0, 0.0))
        buf.update(-2, obs=np.array([value]))
    assert buf[-2]["obs"][0] == np.float16(value)


def state_of_version(src: ReplayBuffer, version) -> dict:
    state = src.state_dict()
    if version is None:
        del state["format_version"]
    else:
        state["format_version"] = version
    return state


@pytest.mark.parametrize("version", [1, 3, 4, None])
def test_load_refuses_a_state_of_another_format_version(tmp_path, version):
    """A buffer saved in another layout (e.g. version 1, before per-stream sizes) is refused, never misread."""
    src = ReplayBuffer(8, OBS_DIM, ACTION_DIM, streams=2, seed=1)
    fill_streams(src, [3, 4])
    state = state_of_version(src, version)
    src.save(tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz") as data:
        files = {k: data[k] for k in data.files}
    meta = {k: v for k, v in state.items() if k != "columns"}
    np.savez(tmp_path / "old.npz", **{**files, "meta": np.array(json.dumps(meta))})
    dst = ReplayBuffer(8, OBS_DIM, ACTION_DIM, streams=2, seed=5)
    before = fill_streams(dst, [1, 2])
    rng_state = dst.rng.bit_generator.state
    with pytest.raises(ValueError):
        dst.load_state_dict(state)
    with pytest.raises(ValueError, match="old.npz"):
        dst.load(tmp_path / "old.npz")
    # Refused before anything is written.
    assert_contents(dst, [r for rows in before for r in rows])
    assert dst.rng.bit_generator.state == rng_state
    dst.load_state_dict(state_of_version(src, src.state_dict()["format_version"]))  # the current version loads
    assert_contents(dst, [transition(k, i) for k, n in enumerate([3, 4]) for i in range(n)])


def test_a_state_without_a_copy_is_the_stored_rows_in_place_and_a_wrong_one_changes_nothing():
    """state_dict(copy=False), what a checkpoint writes, hands over the stored rows on the ring's own memory, so
    saving never needs a second copy of the buffer; and only those rows (a view's storage would be the whole table,
    which torch.save writes whole). Rows of other shapes are refused before anything is written."""
    src = ReplayBuffer(40, OBS_DIM, ACTION_DIM, streams=2, seed=1)
    fill_streams(src, [3, 25])  # stream 1 wraps: its rows are two spans of its segment
    src.delete_oldest(1, stream=0)
    state, spans = src.state_dict(copy=False), src.ring.spans()
    assert len(spans) == 3
    for dt, table in src.ring.tables.items():
        pieces = state["tables"][str(dt)]
        assert [p.data_ptr() for p in pieces] == [table[row].data_ptr() for row, _ in spans]
        assert sum(p.untyped_storage().nbytes() for p in pieces) == len(src) * table.shape[1] * table.element_size()
    dst = ReplayBuffer(40, OBS_DIM, ACTION_DIM, streams=2, seed=5)
    before = fill_streams(dst, [1, 2])
    rng_state = dst.rng.bit_generator.state
    with pytest.raises(ValueError, match="cannot take"):
        dst.load_state_dict({**state, "tables": {k: [p[:-1] for p in ps] for k, ps in state["tables"].items()}})
    with pytest.raises(ValueError, match="cannot take"):
        dst.load_state_dict({**state, "ptrs": [0, 20]})  # a pointer past its segment
    assert_contents(dst, [r for rows in before for r in rows])
    assert dst.rng.bit_generator.state == rng_state


def test_a_state_of_another_format_version_is_refused_with_a_message_saying_so():
    """Refusing another format version says the version differs (the shapes match, so they cannot explain it)."""
    src = ReplayBuffer(8, OBS_DIM, ACTION_DIM, streams=2, seed=1)
    dst = ReplayBuffer(8, OBS_DIM, ACTION_DIM, streams=2, seed=5)
    with pytest.raises(ValueError, match="(?i)version"):
        dst.load_state_dict(state_of_version(src, 1))
