"""Unit tests of RingBuffer: the logical-index table that ReplayBuffer's correctness rests on.

Each row carries a unique integer `id`, so any misplaced, stale or skipped row shows up as a wrong id.
"""

from __future__ import annotations

import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldmodel.replay import ReplayBuffer
from worldmodel.ring import RingBuffer

# A vector column, a scalar bool and an integer id: covers the shapes and dtypes ReplayBuffer uses.
SCHEMA = {"id": ((), np.int64), "vec": ((2,), np.float32), "flag": ((), np.bool_)}

# Derandomized and without an example database, so a run is reproducible and writes nothing into the repo.
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def row(i: int) -> dict:
    return {"id": i, "vec": np.array([i, -2 * i], np.float32), "flag": i % 3 == 0}


def rows(ids) -> dict:
    ids = list(ids)
    return {
        "id": np.array(ids, np.int64),
        "vec": np.array([[i, -2 * i] for i in ids], np.float32).reshape(len(ids), 2),
        "flag": np.array([i % 3 == 0 for i in ids], np.bool_),
    }


def filled(capacity: int, n: int) -> RingBuffer:
    ring = RingBuffer(capacity, SCHEMA)
    for i in range(n):
        ring.append(**row(i))
    return ring


def assert_holds(ring: RingBuffer, ids: list[int]) -> None:
    """The ring's logical contents are exactly rows `ids`, oldest first."""
    assert len(ring) == len(ids)
    got = ring.read(slice(None))
    np.testing.assert_array_equal(got["id"], np.array(ids, np.int64))
    expected = rows(ids)
    for name in SCHEMA:
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(got[name], expected[name])


# ---- append / extend ---------------------------------------------------------------------------------------------


@SETTINGS
@given(capacity=st.integers(1, 9), before=st.integers(0, 25), n=st.integers(0, 30), after=st.integers(0, 3))
def test_extend_equals_repeated_append(capacity, before, n, after):
    # `before` appends put the write pointer anywhere (and the ring full or not); n ranges past capacity so
    # extend's skip-the-overwritten-rows path and its two-slice wrap are both exercised.
    by_append, by_extend = filled(capacity, before), filled(capacity, before)
    new = list(range(before, before + n))
    for i in new:
        by_append.append(**row(i))
    by_extend.extend(**rows(new))

    expected = list(range(before + n))[-capacity:]
    assert_holds(by_append, expected)
    assert_holds(by_extend, expected)
    # Same physical layout, so both continue identically from here.
    logical = np.arange(len(by_append))
    np.testing.assert_array_equal(by_append.physical(logical), by_extend.physical(logical))
    for name in SCHEMA:
        np.testing.assert_array_equal(by_append.columns[name], by_extend.columns[name])

    more = list(range(before + n, before + n + after))
    for i in more:
        by_append.append(**row(i))
    by_extend.extend(**rows(more))
    assert_holds(by_append, list(range(before + n + after))[-capacity:])
    assert_holds(by_extend, list(range(before + n + after))[-capacity:])


@SETTINGS
@given(capacity=st.integers(1, 6), chunks=st.lists(st.integers(0, 14), max_size=8))
def test_extend_sequence_keeps_newest_rows(capacity, chunks):
    ring, next_id = RingBuffer(capacity, SCHEMA), 0
    for n in chunks:
        ring.extend(**rows(range(next_id, next_id + n)))
        next_id += n
        assert_holds(ring, list(range(next_id))[-capacity:])


def test_extend_accepts_lists():
    ring = RingBuffer(4, SCHEMA)
    ring.extend(id=[1, 2, 3], vec=[[1, -2], [2, -4], [3, -6]], flag=[False, False, True])
    assert_holds(ring, [1, 2, 3])


# ---- logical <-> physical ----------------------------------------------------------------------------------------


@SETTINGS
@given(capacity=st.integers(1, 10), n=st.integers(0, 35))
def test_physical_mapping_and_negative_indices(capacity, n):
    ring = filled(capacity, n)
    stored = list(range(n))[-capacity:]
    size = len(stored)
    assert len(ring) == size

    phys = ring.physical(np.arange(size))
    # A bijection onto `size` distinct physical rows, each holding the row the logical index promises.
    assert len(set(phys.tolist())) == size
    assert all(0 <= p < capacity for p in phys.tolist())
    for i in range(-size, size):
        p = int(ring.physical(i))
        assert ring.columns["id"][p] == stored[i]
        assert int(ring.read(i)["id"]) == stored[i]
        np.testing.assert_array_equal(ring.read(i)["vec"], np.array([stored[i], -2 * stored[i]], np.float32))
    if size:
        # -1 is the newest row, which sits just behind the write pointer.
        assert int(ring.physical(-1)) == (ring.ptr - 1) % capacity
        assert int(ring.physical(-size)) == int(ring.physical(0))

    for bad in (size, size + 1, -size - 1, -size - 7):
        with pytest.raises(IndexError):
            ring.physical(bad)
        with pytest.raises(IndexError):
            ring.read(bad)
    with pytest.raises(IndexError):
        ring.physical(np.array([0, size]))  # one bad element poisons the whole request


@SETTINGS
@given(data=st.data(), capacity=st.integers(1, 10), n=st.integers(0, 30))
def test_slices_and_index_arrays_follow_python_semantics(data, capacity, n):
    ring = filled(capacity, n)
    stored = list(range(n))[-capacity:]
    sl = data.draw(st.slices(max(len(stored), 1)))
    np.testing.assert_array_equal(ring.read(sl)["id"], np.array(stored[sl], np.int64))
    if stored:
        idx = data.draw(st.lists(st.integers(-len(stored), len(stored) - 1), max_size=6))
        got = ring.read(np.array(idx, np.int64))["id"]
        np.testing.assert_array_equal(got, np.array([stored[i] for i in idx], np.int64))


def test_non_integer_index_is_rejected():
    ring = filled(3, 2)
    with pytest.raises(TypeError):
        ring.physical(np.array([0.0]))
    with pytest.raises(TypeError):
        ring.physical(np.array([True]))


def test_empty_ring_has_no_valid_index():
    ring = RingBuffer(3, SCHEMA)
    for bad in (0, -1):
        with pytest.raises(IndexError):
            ring.read(bad)
    assert len(ring.read(slice(None))["id"]) == 0


# ---- write -------------------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), capacity=st.integers(1, 8), n=st.integers(1, 25))
def test_write_then_read(data, capacity, n):
    ring = filled(capacity, n)
    stored = list(range(n))[-capacity:]
    size = len(stored)
    i = data.draw(st.integers(-size, size - 1))
    ring.write(i, vec=np.array([100.5, -7.25], np.float32), flag=True)

    expected = rows(stored)
    expected["vec"][i] = [100.5, -7.25]
    expected["flag"][i] = True
    got = ring.read(slice(None))
    for name in SCHEMA:
        np.testing.assert_array_equal(got[name], expected[name])  # `id` untouched: a partial write is allowed

    # Array index, one value broadcast to every named row.
    idx = data.draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=4))
    ring.write(np.array(idx), id=-1)
    expected["id"][np.array(idx)] = -1
    np.testing.assert_array_equal(ring.read(slice(None))["id"], expected["id"])


def test_write_rejects_unknown_column_and_bad_index_without_writing():
    ring = filled(3, 5)
    before = {k: v.clone() for k, v in ring.columns.items()}
    with pytest.raises(KeyError):
        ring.write(0, nope=1)
    with pytest.raises(IndexError):
        ring.write(3, id=99)
    with pytest.raises(IndexError):
        ring.write(np.array([0, -4]), id=99)
    for name in SCHEMA:
        np.testing.assert_array_equal(ring.columns[name], before[name])


# ---- clear -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 2, 4, 9])
def test_clear_keeps_allocation_and_empties(n):
    ring = filled(4, n)
    arrays = dict(ring.columns)
    ring.clear()
    assert len(ring) == 0
    assert ring.capacity == 4
    assert all(ring.columns[name] is arrays[name] for name in SCHEMA)  # no reallocation
    with pytest.raises(IndexError):
        ring.read(0)
    # Old rows must not leak back in when refilling.
    ring.append(**row(100))
    assert_holds(ring, [100])
    ring.extend(**rows(range(101, 106)))
    assert_holds(ring, [102, 103, 104, 105])


# ---- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["append", "extend"])
def test_missing_or_unknown_column_raises_key_error_and_writes_nothing(op):
    ring = filled(3, 2)
    before = {k: v.clone() for k, v in ring.columns.items()}
    full = row(7) if op == "append" else rows([7, 8])
    missing = {k: v for k, v in full.items() if k != "flag"}
    unknown = {**full, "extra": full["id"]}
    for bad in (missing, unknown, {}):
        with pytest.raises(KeyError):
            getattr(ring, op)(**bad)
    assert_holds(ring, [0, 1])
    for name in SCHEMA:
        np.testing.assert_array_equal(ring.columns[name], before[name])


def test_extend_mismatched_lengths_raises_value_error_and_writes_nothing():
    ring = filled(3, 2)
    bad = rows([7, 8, 9])
    bad["flag"] = bad["flag"][:2]
    with pytest.raises(ValueError):
        ring.extend(**bad)
    assert_holds(ring, [0, 1])


@pytest.mark.parametrize("capacity", [0, -1, -10])
def test_non_positive_capacity_raises(capacity):
    with pytest.raises(ValueError):
        RingBuffer(capacity, SCHEMA)


def test_capacity_one_keeps_only_newest():
    ring = RingBuffer(1, SCHEMA)
    for i in range(3):
        ring.append(**row(i))
        assert_holds(ring, [i])
    ring.extend(**rows([10, 11, 12]))
    assert_holds(ring, [12])


@pytest.mark.parametrize("obs_dtype", ["float32", "bfloat16"])  # bfloat16: the packed path numpy cannot write
def test_extending_by_zero_rows_stores_nothing(obs_dtype):
    buf = ReplayBuffer(8, 3, 2, obs_dtype=obs_dtype)
    empty = {"obs": np.zeros((0, 3)), "action": np.zeros((0, 2)), "reward": np.zeros(0), "next_obs": np.zeros((0, 3)),
             "terminated": np.zeros(0, bool), "truncated": np.zeros(0, bool)}  # fmt: skip
    buf.extend(**empty)
    assert len(buf) == 0


@pytest.mark.parametrize("obs_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("streams", [1, 3])
def test_packed_writes_store_what_column_writes_store(monkeypatch, obs_dtype, streams):
    """A GPU ring packs each table's columns on the host and writes once per table (ring.WRITE_AS_ON_GPU makes a host
    ring write that way): after the same writes of every kind, both rings hold the same tables, bit for bit."""
    from worldmodel import ring as ring_module

    rng = np.random.default_rng(0)
    rings = {packed: ReplayBuffer(3 * 7, 3, 2, streams=streams, obs_dtype=obs_dtype) for packed in (False, True)}

    def rows(*lead):
        return {"obs": rng.normal(size=(*lead, 3)), "action": rng.normal(size=(*lead, 2)),
                "reward": rng.normal(size=lead), "next_obs": rng.normal(size=(*lead, 3)),
                "terminated": rng.random(lead) < 0.2, "truncated": rng.random(lead) < 0.2}  # fmt: skip

    def on_both(method, *args, **kwargs):
        for packed, buf in rings.items():
            monkeypatch.setattr(ring_module, "WRITE_AS_ON_GPU", packed)
            getattr(buf, method)(*args, **kwargs)

    for n in (0, 1, 5, 9, 30):  # 30 rows: more than a stream holds
        on_both("extend", **rows(n), stream=n % streams)
        valid = rng.random((4, streams)) > 0.3
        on_both("extend_streams", valid, **rows(4, streams))
        on_both("add", **{k: v[0] for k, v in rows(1).items()}, stream=streams - 1)
        on_both("update", np.array([0, -1]), reward=rng.normal(size=2), obs=rng.normal(size=(2, 3)))
    for dtype, table in rings[False].ring.tables.items():
        assert torch.equal(table, rings[True].ring.tables[dtype]), dtype


def ring_state(ring: RingBuffer) -> tuple:
    return ring.ptrs.copy(), ring.sizes.copy(), {dt: t.clone() for dt, t in ring.tables.items()}


def assert_unchanged(ring: RingBuffer, state: tuple) -> None:
    ptrs, sizes, tables = state
    np.testing.assert_array_equal(ring.ptrs, ptrs)
    np.testing.assert_array_equal(ring.sizes, sizes)
    for dt, table in ring.tables.items():
        assert torch.equal(table, tables[dt]), dt


@pytest.mark.parametrize("stream", [0, 1])
def test_extend_refuses_a_broadcastable_but_wrong_shape_and_writes_nothing(stream):
    """extend stores exactly the rows given: a column that would only fit by broadcasting is an error, not copied."""
    ring = filled(4, 3) if stream == 0 else RingBuffer(8, SCHEMA, streams=2)
    if stream:
        ring.extend(stream=0, **rows([0, 1, 2]))
    state = ring_state(ring)
    with pytest.raises(ValueError, match="vec"):  # vec [3, 1] for a [3, 2] column (e.g. obs [n, 1] for obs_dim 2)
        ring.extend(stream=stream, **{**rows([7, 8, 9]), "vec": np.ones((3, 1), np.float32)})
    assert_unchanged(ring, state)
    assert_holds(ring, [0, 1, 2])


def test_append_refuses_a_broadcastable_but_wrong_shape_and_writes_nothing():
    """append of a vector column with one value for a 2-vector (e.g. obs [1] for obs_dim 2) is refused."""
    ring = filled(4, 4)  # full: an accepted append would overwrite row 0
    state = ring_state(ring)
    with pytest.raises(ValueError, match="vec"):
        ring.append(**{**row(9), "vec": np.array([9.0], np.float32)})
    assert_unchanged(ring, state)
    assert_holds(ring, [0, 1, 2, 3])


@pytest.mark.parametrize("shape", [(2, 2, 1), (2, 1, 2), (1, 2, 2)], ids=["per-value", "per-stream", "per-step"])
def test_extend_streams_refuses_a_broadcastable_but_wrong_shape_and_writes_nothing(shape):
    """extend_streams needs each column as [T, streams, ...] exactly: a broadcastable one is refused, unwritten."""
    ring = RingBuffer(8, SCHEMA, streams=2)
    ring.extend(stream=0, **rows([0, 1]))
    ring.extend(stream=1, **rows([10]))
    state = ring_state(ring)
    good = {k: v.reshape(2, 2, *v.shape[1:]) for k, v in rows([20, 21, 22, 23]).items()}
    with pytest.raises(ValueError, match="vec"):
        ring.extend_streams(np.ones((2, 2), bool), **{**good, "vec": np.ones(shape, np.float32)})
    assert_unchanged(ring, state)
    ring.extend_streams(np.ones((2, 2), bool), **good)  # the right shape is accepted
    assert ring.read(slice(None))["id"].tolist() == [0, 1, 20, 22, 10, 21, 23]


def test_write_broadcasts_values_over_the_rows_it_updates():
    """update/write, unlike the row writes, broadcasts: one value (or one per row) fills every named row's field."""
    ring = filled(5, 5)
    ring.write(np.array([1, 3]), vec=np.array([[7.0], [8.0]], np.float32))  # [2, 1] -> [2, 2]
    ring.write(slice(0, 1), vec=np.float32(-1.0))  # a scalar for a vector field
    ring.write(4, vec=np.array([5.0], np.float32))
    got = ring.read(slice(None))
    np.testing.assert_array_equal(got["vec"], [[-1, -1], [7, 7], [2, -4], [8, 8], [5, 5]])
    np.testing.assert_array_equal(got["id"], [0, 1, 2, 3, 4])


# ---- writes larger than a stream, and the GPU write path -----------------------------------------------------------


@pytest.mark.parametrize("how", ["extend", "extend_streams"])
def test_a_write_of_more_rows_than_a_stream_holds_names_each_table_row_once(monkeypatch, how):
    """Of a write larger than its stream only the newest rows are kept, and no table row may be written twice in one
    write: a GPU ring writes through torch's index_put, whose result for duplicate indices is undefined on CUDA (an
    older row could win). On the host numpy's last-write-wins hides a duplicate, so the rows are checked directly."""
    ring = RingBuffer(6, SCHEMA, streams=2)
    ring.extend(stream=1, **rows([0]))  # stream 1's pointer away from its segment's start
    written = []
    write = RingBuffer._write

    def spy(self, rows_at, values):
        written.append(np.arange(self.capacity)[rows_at])
        write(self, rows_at, values)

    monkeypatch.setattr(RingBuffer, "_write", spy)
    if how == "extend":
        ring.extend(stream=1, **rows(range(1, 9)))  # 8 rows for a stream of 3
        expected = [6, 7, 8]
    else:
        block = {k: v.reshape(4, 2, *v.shape[1:]) for k, v in rows(range(1, 9)).items()}
        ring.extend_streams(np.ones((4, 2), bool), **block)  # 4 rows for each stream of 3
        expected = [3, 5, 7, 4, 6, 8]
    assert written and all(len(np.unique(at)) == len(at) for at in written), written
    assert ring.read(slice(None))["id"].tolist() == expected


def test_extend_streams_refuses_a_valid_mask_of_another_stream_count_and_writes_nothing():
    """valid [T, 1] for a 2-stream ring (with rows shaped to match it) would broadcast over the stream pointers and
    write rows into the wrong streams: it is refused before anything is written."""
    ring = RingBuffer(8, SCHEMA, streams=2)
    ring.extend(stream=0, **rows([0, 1]))
    state = ring_state(ring)
    one_stream = {k: v.reshape(2, 1, *v.shape[1:]) for k, v in rows([20, 21]).items()}
    with pytest.raises(ValueError, match=r"valid must be \[T, 2\]"):
        ring.extend_streams(np.ones((2, 1), bool), **one_stream)
    assert_unchanged(ring, state)


def test_a_write_as_on_gpu_is_one_copy_per_table(monkeypatch):
    """test_packed_writes_store_what_column_writes_store compares the packed path with the column path: it only
    means something if WRITE_AS_ON_GPU really packs. Each write of whole rows is then one copy per table (the point
    of packing on a GPU: one transfer and launch per dtype), never one per column."""
    from worldmodel import ring as ring_module

    monkeypatch.setattr(ring_module, "WRITE_AS_ON_GPU", True)
    buf = ReplayBuffer(8, 3, 2, streams=2)
    targets, copy_into = [], ring_module.copy_into
    monkeypatch.setattr(ring_module, "copy_into", lambda dst, index, value: (targets.append(dst),
                                                                           copy_into(dst, index, value)))  # fmt: skip
    one = {"obs": np.ones(3), "action": np.zeros(2), "reward": 1.0, "next_obs": np.ones(3), "terminated": False,
           "truncated": True}  # fmt: skip
    buf.add(**one, stream=1)
    buf.extend(**{k: np.asarray([v, v]) for k, v in one.items()}, stream=0)
    buf.extend_streams(np.ones((1, 2), bool), **{k: np.asarray([[v, v]]) for k, v in one.items()})
    tables = list(buf.ring.tables.values())
    assert len(tables) == 2 and len(targets) == 3 * len(tables)
    assert all(any(dst is table for table in tables) for dst in targets)


def test_drop_oldest_refuses_a_negative_count_and_changes_nothing():
    ring = RingBuffer(4, {"x": ((), np.float32)})
    ring.extend(x=np.arange(2, dtype=np.float32))
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        ring.drop_oldest(-2)
    assert len(ring) == 2 and ring.read(slice(None))["x"].tolist() == [0.0, 1.0]
