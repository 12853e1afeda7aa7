"""The benchmarks' building blocks run against the current API (no timings here: benchmarks are never tests)."""

from __future__ import annotations

import inspect
import json
import sys
import time
import types

import numpy as np
import pytest
import torch

from conftest import REPO
from worldmodel.replay import Batch

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_collection  # noqa: E402
import bench_sampling  # noqa: E402
import bench_sweep_check  # noqa: E402
import bench_time_to_quality  # noqa: E402
import bench_updates  # noqa: E402
import common  # noqa: E402
from common import Row, busy_share, page_faults, time_per_call  # noqa: E402


def test_sampling_setups_hold_the_same_wrapped_stream():
    ours = bench_sampling.ours(1000, 3, "cpu")
    seed = bench_sampling.seed(1000, 3)
    assert len(ours) == seed.size == 1000
    # Both were fed capacity + 10%: the oldest stored row is the 101st written, in both.
    oldest_seed = seed.obs_buffer[seed.ptr]
    np.testing.assert_array_equal(ours[0]["obs"], oldest_seed)
    batch = ours.sample(bench_sampling.BATCH, bench_sampling.SEQ_LEN)
    assert batch.obs.shape == (bench_sampling.BATCH, bench_sampling.SEQ_LEN, 3)


def test_the_sweep_check_benchmark_times_a_grid_of_about_the_jobs_asked_for(capsys, monkeypatch):
    assert [len(o.split("=")[1].split(",")) for o in bench_sweep_check.grid(200)] == [6, 6, 6]  # 216 jobs
    monkeypatch.setattr(sys, "argv", ["bench_sweep_check.py", "--jobs", "8"])
    bench_sweep_check.main()
    assert capsys.readouterr().out.startswith("8 jobs: the pre-launch check took ")


def test_collection_counts_only_stored_steps():
    assert bench_collection.ours_steps_per_s(4, 400, per_call=40) > 0
    assert bench_collection.ours_steps_per_s(4, 40, per_call=4) > 0  # one vector step per call
    assert bench_collection.seed_steps_per_s(200) > 0


@pytest.mark.parametrize("make", ["ours", *bench_updates.VARIANTS, "seed", "seed_loop_our_model"])
def test_update_closures_take_finite_steps(make):
    data = bench_updates.cartpole_data(500)
    if make == "ours" or make in bench_updates.VARIANTS:
        update, sample = bench_updates.ours(data, 4, 8, 8, "cpu", compile=False,
                                            **bench_updates.VARIANTS.get(make, {}))  # fmt: skip
        assert torch.isfinite(update()).all() and sample().obs.shape == (4, 8, 4)
    elif make == "seed":
        assert torch.isfinite(bench_updates.seed(data, 4, 8, 8, "cpu")())
    else:  # the seed's loop on our model, and on each variant of it (the variant rows' note)
        for kwargs in [{}, *bench_updates.VARIANTS.values()]:
            bench_updates.seed_loop_our_model(data, 4, 8, 8, "cpu", **kwargs)()


def test_time_to_quality_metric_and_rows():
    target = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert bench_time_to_quality.nmse(target, target) == 0.0
    # Predicting the mean of each dimension scores exactly 1.
    assert bench_time_to_quality.nmse(target.mean(0).expand(2, 2), target) == pytest.approx(1.0)
    val = bench_time_to_quality.validation_windows(seed=3, steps=300)
    assert val.obs.shape[1] == bench_time_to_quality.CONTEXT and not val.first[:, 1:].any()
    row = Row("x", "y", ours=2.0, baseline=6.0, baseline_name="b", unit="s", higher_is_better=False)
    assert row.ratio == 3.0 and time_per_call(lambda: None, calls=2, repeats=2) >= 0


def test_train_until_stops_at_the_target_and_keeps_the_best_nmse():
    val = bench_time_to_quality.validation_windows(seed=3, steps=300)
    steps = []
    exact_after_15 = lambda v: v.next_obs[:, -1] if len(steps) >= 15 else v.obs[:, -1]  # noqa: E731
    result = bench_time_to_quality.train_until(60.0, "cpu", lambda: steps.append(1), exact_after_15, val)
    assert result.updates == 20 and result.seconds is not None and result.best == 0.0  # checked every 10 updates
    copy_last = bench_time_to_quality.nmse(val.obs[:, -1], val.next_obs[:, -1])
    result = bench_time_to_quality.train_until(0.05, "cpu", lambda: time.sleep(0.002), lambda v: v.obs[:, -1], val)
    assert result.seconds is None and result.updates >= 10 and result.best == pytest.approx(copy_last)


def test_gpu_busy_share_is_the_union_of_device_spans():
    assert busy_share([]) == 0.0
    assert busy_share([(0, 10)]) == 1.0
    # Two overlapping kernels [0, 4) and [2, 6), a gap, then [8, 10): busy 6 + 2 of the 10 between first and last.
    assert busy_share([(8, 10), (0, 4), (2, 6)]) == pytest.approx(0.8)
    assert busy_share([(0, 10), (2, 3)]) == 1.0  # nested spans count once


def test_page_faults_counts_fresh_memory():
    faults = page_faults(lambda: np.ones(8 << 20), calls=2)  # 64 MB a call: mapped fresh, above glibc's mmap limit
    if faults is None:
        pytest.skip("this OS does not count page faults")
    # At least one fault per 2 MB (huge) page of the 64 MB, and far fewer when nothing is allocated.
    assert faults >= 32 and page_faults(lambda: None, calls=2) < 8


def test_seed_batches_within_episodes_never_cross_a_reset():
    buffer = bench_updates.SeedReplayBuffer(500, (3,), (2,))
    rng = np.random.default_rng(0)
    for t in range(500):
        buffer.add(rng.normal(size=3), rng.normal(size=2), 1.0, t % 7 == 6)  # episodes of 7 steps
    crossing = bench_updates.seed_batch(buffer, 64, 5, "cpu")
    assert crossing.terminated.any()  # plain seed windows do reach an episode's end, and its target is a reset
    within = bench_updates.seed_batch(buffer, 64, 5, "cpu", within_episodes=True)
    assert within.obs.shape == (64, 5, 3) and not within.terminated.any() and not within.first[:, 1:].any()


# --- Smoke tests of every benchmark's rows() and of run.main, at tiny sizes. The timed callables are stubbed to
# return known, different numbers for ours and each baseline, so each Row's sides, units and ratio are checked
# without ever asserting a real timing.

def test_row_ratio_is_how_many_times_better_ours_is_whichever_way_the_unit_points():
    faster = Row("b", "c", ours=6.0, baseline=2.0, baseline_name="x", unit="steps/s", higher_is_better=True)
    assert faster.ratio == 3.0
    slower = Row("b", "c", ours=2.0, baseline=6.0, baseline_name="x", unit="steps/s", higher_is_better=True)
    assert slower.ratio == pytest.approx(1 / 3)
    assert Row("b", "c", 2.0, 6.0, "x", "ms", False).ratio == 3.0
    assert Row("b", "c", 6.0, 2.0, "x", "ms", False).ratio == pytest.approx(1 / 3)


def test_time_per_call_is_the_median_time_of_one_call(monkeypatch):
    clock = [0.0]
    durations = iter([1.0] * 3 + [0.5] * 4 + [2.0] * 4 + [0.25] * 4)  # warmup, then three repeats of 4 calls

    def fn():
        clock[0] += next(durations)

    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert common.time_per_call(fn, calls=4, repeats=3, warmup=3) == 0.5  # median of 0.5, 2.0, 0.25 per call


# Seconds per call the stubbed timer returns for each side of the sampling rows.
T_SEED, T_OURS, T_ONE_THREAD, T_TORCHRL = 4e-6, 1e-6, 2e-6, 8e-6


def test_sampling_rows_sides_ratio_and_gathered_bytes(monkeypatch):
    batch, seq_len, capacity = 64, 16, 4000
    monkeypatch.setattr(bench_sampling, "BATCH", batch)
    monkeypatch.setattr(bench_sampling, "SEQ_LEN", seq_len)
    monkeypatch.setattr(bench_sampling, "memcpy_gbps", lambda: 10.0)
    capacities = []
    real_ours, real_seed, real_torchrl = bench_sampling.ours, bench_sampling.seed, bench_sampling.torchrl_sampler

    def small(real):
        def make(cap, obs_dim, *args, **kwargs):
            capacities.append(cap)
            return real(capacity, obs_dim, *args, **kwargs)

        return make

    monkeypatch.setattr(bench_sampling, "ours", small(real_ours))
    monkeypatch.setattr(bench_sampling, "seed", small(real_seed))
    monkeypatch.setattr(bench_sampling, "torchrl_sampler", small(real_torchrl))

    def fake_time_per_call(fn, calls, repeats=5, warmup=3, device=None):
        if inspect.ismethod(fn):  # rb.sample: TorchRL's replay buffer
            assert type(fn.__self__).__module__.startswith("torchrl")
            fn()
            return T_TORCHRL
        out = fn()
        if isinstance(out, tuple):  # the seed's np.stack sampler returns numpy arrays
            assert all(isinstance(a, np.ndarray) for a in out) and out[0].shape == (batch, seq_len, out[0].shape[2])
            return T_SEED
        assert isinstance(out, Batch) and out.obs.shape[:2] == (batch, seq_len)
        return T_OURS if torch.get_num_threads() > 1 else T_ONE_THREAD

    monkeypatch.setattr(bench_sampling, "time_per_call", fake_time_per_call)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the extra "ours on 1 thread" row is measured whenever torch has more than one thread
    try:
        rows = list(bench_sampling.rows(quick=True, device="cpu"))
        assert torch.get_num_threads() == 2  # put back after the one-thread row
    finally:
        torch.set_num_threads(threads)

    assert set(capacities) == {200_000}  # --quick's capacity asked for (shrunk here)
    with_torchrl = real_torchrl(100, 4) is not None
    per_dim = 2 + 2 * with_torchrl
    assert len(rows) == 2 * per_dim
    for obs_dim, group in zip((4, 64), (rows[:per_dim], rows[per_dim:])):
        main, one = group[:2]
        gathered = batch * seq_len * (2 * obs_dim + bench_sampling.ACTION_DIM + 1) * 4 + 2 * batch * seq_len
        for row in group:
            assert row.bench == "sampling" and row.unit == "ms" and row.higher_is_better is False
            assert f"obs_dim {obs_dim}, batch {batch} x {seq_len}, capacity 200,000 (wrapped)" in row.case
        assert main.baseline_name == "seed np.stack" and main.case.endswith("(wrapped)")
        assert main.ours == pytest.approx(T_OURS * 1e3) and main.baseline == pytest.approx(T_SEED * 1e3)
        assert main.ratio == pytest.approx(T_SEED / T_OURS)
        assert main.notes["gathered"] == f"{gathered / 1e6:.2f} MB"
        assert float(main.notes["GB/s"]) == pytest.approx(gathered / T_OURS / 1e9, abs=0.05)
        assert main.notes["memcpy GB/s"] == "10.0"
        assert main.notes["of memcpy"] == f"{gathered / T_OURS / 1e9 / 10:.0%}"
        assert main.notes["torch threads"] == 2
        assert one.case.endswith("ours on 1 thread as np.stack") and one.baseline_name == "seed np.stack"
        assert one.ours == pytest.approx(T_ONE_THREAD * 1e3) and one.baseline == pytest.approx(T_SEED * 1e3)
        assert one.ratio == pytest.approx(T_SEED / T_ONE_THREAD)
        assert float(one.notes["GB/s"]) == pytest.approx(gathered / T_ONE_THREAD / 1e9, abs=0.05)
        for row in group[2:]:  # TorchRL's SliceSampler, when installed: against ours at full threads
            assert row.baseline_name.startswith("TorchRL SliceSampler")
            assert row.ours == pytest.approx(T_OURS * 1e3) and row.baseline == pytest.approx(T_TORCHRL * 1e3)
            assert row.ratio == pytest.approx(T_TORCHRL / T_OURS)
        if with_torchrl:
            assert "cache_values=True" not in group[2].baseline_name and "cache_values=True" in group[3].baseline_name


#: Stubbed measurements of the collection rows: steps/s of the seed loop, of the env alone and of ours.
SEED_SPS = 1000.0
ENV_SPS = {16: 40_000.0, 64: 128_000.0}
OURS_SPS = {(16, "prefill"): 20_000.0, (16, "step"): 8_000.0, (64, "prefill"): 64_000.0, (64, "step"): 32_000.0}


def patch_collection(monkeypatch) -> list:
    """Stubs bench_collection's three measurements with the numbers above; returns the list of calls they get."""
    calls = []

    def ours(num_envs, steps, per_call):
        calls.append(("ours", num_envs, steps, per_call))
        return OURS_SPS[num_envs, "step" if per_call == num_envs else "prefill"]

    def env_only(num_envs, steps):
        calls.append(("env", num_envs, steps))
        return ENV_SPS[num_envs]

    def seed(steps):
        calls.append(("seed", steps))
        return SEED_SPS

    monkeypatch.setattr(bench_collection, "ours_steps_per_s", ours)
    monkeypatch.setattr(bench_collection, "env_only_steps_per_s", env_only)
    monkeypatch.setattr(bench_collection, "seed_steps_per_s", seed)
    return calls


def check_collection_row(row: dict, num_envs: int, how: str) -> None:
    ours = OURS_SPS[num_envs, how]
    assert row["bench"] == "collection" and row["unit"] == "steps/s" and row["higher_is_better"] is True
    assert row["baseline_name"] == "seed one-env loop" and f"{num_envs} envs" in row["case"]
    assert ("(a prefill)" in row["case"]) == (how == "prefill")
    assert ("one vector step per call" in row["case"]) == (how == "step")
    assert row["ours"] == ours and row["baseline"] == SEED_SPS and row["ratio"] == pytest.approx(ours / SEED_SPS)
    assert row["notes"]["ours / env alone"] == f"{ours / ENV_SPS[num_envs]:.0%}"
    assert row["notes"]["env alone"] == f"{ENV_SPS[num_envs]:,.0f} steps/s"


COLLECTION_ORDER = [(16, "prefill"), (16, "step"), (64, "prefill"), (64, "step")]


def test_collection_rows_sides_and_ratio(monkeypatch):
    calls = patch_collection(monkeypatch)
    rows = bench_collection.rows(quick=True)
    assert len(rows) == 4
    for row, (num_envs, how) in zip(rows, COLLECTION_ORDER):
        check_collection_row({**row.__dict__, "ratio": row.ratio}, num_envs, how)
    # --quick: 100,000 steps per prefill row in blocks of 10,000, 10,000 steps a vector step at a time.
    assert ("ours", 16, 100_000, 10_000) in calls and ("ours", 64, 10_000, 64) in calls and ("seed", 10_000) in calls


#: Stubbed seconds per call of each timed callable of the updates rows, by the tag its factory gave it.
UPDATE_TIMES = {"seed": 0.04, "ours": 0.01, "sample": 0.002, "seed loop our model": 0.02,
                "ours head_layers=2": 0.0125, "seed loop our model head_layers=2": 0.05,
                "ours precision=bf16": 0.025, "seed loop our model precision=bf16": 0.1}  # fmt: skip
UPDATE_FAULTS = {"seed": 7.0, "ours": 0.0}


def _tagged(fn, tag):
    def call():
        return fn()

    call.tag = tag
    return call


def _variant(kwargs: dict) -> str:
    return "".join(f" {k}={v}" for k, v in kwargs.items() if v not in (None, "fp32"))


def test_updates_rows_sides_and_ratio(monkeypatch):
    monkeypatch.setattr(bench_updates, "CONFIGS", {"seed config": (4, 4, 8)})
    monkeypatch.setattr(bench_updates, "DATA_STEPS", 1000)
    real_ours, real_seed, real_loop = bench_updates.ours, bench_updates.seed, bench_updates.seed_loop_our_model

    def ours(data, batch, seq_len, latent, device, compile, **kwargs):
        assert compile is False and not kwargs.get("cuda_graph")
        update, sample = real_ours(data, batch, seq_len, latent, device, compile, **kwargs)
        return _tagged(update, "ours" + _variant(kwargs)), _tagged(sample, "sample")

    monkeypatch.setattr(bench_updates, "ours", ours)
    monkeypatch.setattr(bench_updates, "seed", lambda *a, **k: _tagged(real_seed(*a, **k), "seed"))
    monkeypatch.setattr(bench_updates, "seed_loop_our_model",
                        lambda *a, **k: _tagged(real_loop(*a, **k), "seed loop our model" + _variant(k)))

    def fake_time_per_call(fn, calls, repeats=5, warmup=3, device=None):
        fn()  # one real (tiny) step of each, so every closure runs
        return UPDATE_TIMES.get(getattr(fn, "tag", None), 1e-3)  # untagged: the GRU rows' lambdas

    def fake_page_faults(fn, calls):
        return UPDATE_FAULTS[fn.tag]

    monkeypatch.setattr(bench_updates, "time_per_call", fake_time_per_call)
    monkeypatch.setattr(bench_updates, "page_faults", fake_page_faults)
    rows = list(bench_updates.rows(quick=True, device="cpu", compile=False))

    case = "seed config: batch 4, seq_len 4, latent 8, cpu"
    t = UPDATE_TIMES
    expected = [  # case, ours, baseline, baseline name
        (case, 1 / t["ours"], 1 / t["seed"], "seed loop"),
        (f"{case}, both with our model", 1 / t["ours"], 1 / t["seed loop our model"], "seed loop, our model"),
        (f"{case}, ours with model.head_layers=2", 1 / t["ours head_layers=2"], 1 / t["seed"], "seed loop"),
        (f"{case}, ours with trainer.precision=bf16", 1 / t["ours precision=bf16"], 1 / t["seed"], "seed loop"),
    ]
    assert len(rows) == len(expected) + 2  # then the GRU rows: against nn.GRUCell stepped and nn.GRU
    for row, (label, ours_rate, base_rate, name) in zip(rows, expected):
        assert row.bench == "updates" and row.unit == "updates/s" and row.higher_is_better is True
        assert row.case == label and row.baseline_name == name
        assert row.ours == pytest.approx(ours_rate) and row.baseline == pytest.approx(base_rate)
        assert row.ratio == pytest.approx(ours_rate / base_rate)
    main = rows[0]
    assert main.notes["sampling share of step"] == f"{t['sample'] / t['ours']:.0%}"
    assert main.notes["page faults per update"] == "0 (seed loop 7)"
    for row, variant in zip(rows[2:4], ("head_layers=2", "precision=bf16")):
        seed_t, ours_t = t[f"seed loop our model {variant}"], t[f"ours {variant}"]
        assert row.notes["seed loop training this model"] == f"{1 / seed_t:,.4g} updates/s, ours {seed_t / ours_t:.2f}x"
    gru = rows[len(expected):]
    assert [r.baseline_name for r in gru] == ["nn.GRUCell stepped", "nn.GRU, no resets"]
    for row in gru:
        assert row.bench == "updates" and row.unit == "ms" and row.higher_is_better is False
        assert row.case.startswith("GRU forward + backward, seed config: batch 4, seq_len 4, latent 8")


def test_time_to_quality_rows_sides_ratio_and_seed_target(monkeypatch):
    ttq = bench_time_to_quality
    real_val, real_ours, real_seed = ttq.validation_windows, ttq.ours, ttq.seed
    monkeypatch.setattr(ttq, "validation_windows", lambda seed, steps=2000: real_val(seed, steps=300))
    side = []  # which side is training now, set by the wrappers below
    budgets = []

    def ours(budget_s, device):
        side.append("ours")
        budgets.append(budget_s)
        return real_ours(budget_s, device)

    def seed(budget_s, device, our_model=False, within_episodes=False):
        side.append(("seed", our_model, within_episodes))
        budgets.append(budget_s)
        return real_seed(budget_s, device, our_model, within_episodes)

    monkeypatch.setattr(ttq, "ours", ours)
    monkeypatch.setattr(ttq, "seed", seed)
    results = {
        "ours": ttq.Result(2.0, 120, 4e-4),
        ("seed", False, False): ttq.Result(6.0, 300, 8e-4),
        ("seed", True, False): ttq.Result(None, 500, 2e-3),  # not reached: the budget is its time
        ("seed", True, True): ttq.Result(5.0, 250, 9e-4),
    }

    def fake_train_until(budget_s, device, step, predict, val, spent=0.0):
        assert spent > 0  # the prefill's seconds are counted
        for _ in range(3):
            step()  # a few real steps of each loop
        with torch.no_grad():
            assert predict(val).shape == val.next_obs[:, -1].shape
        return results[side[-1]]

    monkeypatch.setattr(ttq, "train_until", fake_train_until)
    seed_updates, seed_batches = [], []  # predict_next of each seed_update, within_episodes of each seed_batch
    real_seed_update, real_seed_batch = ttq.seed_update, ttq.seed_batch

    def spy_seed_update(*args, predict_next=False, **kwargs):
        seed_updates.append(predict_next)
        return real_seed_update(*args, predict_next=predict_next, **kwargs)

    def spy_seed_batch(buffer, batch, seq_len, device, within_episodes=False):
        seed_batches.append(within_episodes)
        return real_seed_batch(buffer, batch, seq_len, device, within_episodes)

    monkeypatch.setattr(ttq, "seed_update", spy_seed_update)
    monkeypatch.setattr(ttq, "seed_batch", spy_seed_batch)
    rows = ttq.rows(quick=True, device="cpu")

    assert set(budgets) == {60.0}
    # The seed-equivalent loop predicts the next observation (as ours does), not its input.
    assert seed_updates == [True] * 3
    assert seed_batches == [False] * 3 + [True] * 3  # our model in the seed loop, then only windows within episodes
    case = "CartPole-v1, one-step nmse <= 0.001, cpu"
    expected = [  # case, baseline name, baseline seconds
        (case, "seed-equivalent loop", 6.0),
        (f"{case}, both with our model", "seed loop training our model", 60.0),
        (f"{case}, both with our model, theirs without windows across resets", "the same, windows within episodes",
         5.0),
    ]
    assert len(rows) == 3
    for row, (label, name, baseline) in zip(rows, expected):
        assert row.bench == "time-to-quality" and row.unit == "s" and row.higher_is_better is False
        assert row.case == label and row.baseline_name == name
        assert row.ours == 2.0 and row.baseline == baseline and row.ratio == pytest.approx(baseline / 2.0)
        assert row.notes["best nmse"].startswith("ours 0.0004, theirs ") and "ours" not in row.notes
    assert rows[0].notes["updates"] == "ours 120, theirs 300"
    assert "theirs" in rows[1].notes and "theirs" not in rows[0].notes and "theirs" not in rows[2].notes


def test_run_main_prints_and_saves_the_collection_rows(monkeypatch, capsys, tmp_path):
    import run

    patch_collection(monkeypatch)
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--device", "cpu", "--only", "collection",
                                      "--json", str(out)])  # fmt: skip
    run.main()
    saved = json.loads(out.read_text())
    assert saved["machine"] and len(saved["rows"]) == 4
    for row, (num_envs, how) in zip(saved["rows"], COLLECTION_ORDER):
        check_collection_row(row, num_envs, how)
    printed = capsys.readouterr().out
    assert "| benchmark | case | ours | baseline | ratio (x better) | notes |" in printed
    ratio = OURS_SPS[64, "prefill"] / SEED_SPS
    line = "| 64,000 steps/s | 1,000 steps/s (seed one-env loop) | 64.00 |"
    assert ratio == 64.0
    assert printed.count(line) == 2  # as soon as measured, then in the table


def _stub_rows(name, log, fail=False):
    def rows(quick, device):
        log.append((name, quick, device))
        yield Row(name, "case", 2.0, 1.0, "base", "x", True)
        if fail:
            raise RuntimeError("benchmark failed")

    return rows


def test_run_main_passes_its_arguments_to_every_benchmark_and_keeps_rows_when_one_fails(monkeypatch, capsys, tmp_path):
    import run

    log = []
    monkeypatch.setattr(bench_sampling, "rows", _stub_rows("sampling", log))
    monkeypatch.setattr(bench_time_to_quality, "rows", _stub_rows("time-to-quality", log))

    def collection_rows(quick=False, device="cpu"):
        log.append(("collection", quick))
        return [Row("collection", "case", 3.0, 1.0, "base", "x", True)]

    def updates_rows(quick=False, device="cpu", compile=False):
        log.append(("updates", quick, device, compile))
        yield Row("updates", "case", 4.0, 1.0, "base", "x", True)
        raise RuntimeError("benchmark failed")

    monkeypatch.setattr(bench_collection, "rows", collection_rows)
    monkeypatch.setattr(bench_updates, "rows", updates_rows)
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--device", "cpu", "--json", str(out)])
    with pytest.raises(RuntimeError, match="benchmark failed"):
        run.main()
    assert log == [("sampling", True, "cpu"), ("collection", True), ("updates", True, "cpu", False)]
    # The rows measured before the failure are printed as a table and saved; time to quality never ran.
    saved = json.loads(out.read_text())["rows"]
    assert [(r["bench"], r["ours"], r["ratio"]) for r in saved] == [("sampling", 2.0, 2.0), ("collection", 3.0, 3.0),
                                                                     ("updates", 4.0, 4.0)]  # fmt: skip
    assert "| benchmark | case |" in capsys.readouterr().out

    monkeypatch.setattr(bench_updates, "rows", lambda quick=False, device="cpu", compile=False: iter(()))
    log.clear()
    monkeypatch.setattr(sys, "argv", ["run.py", "--device", "cpu", "--compile", "--only", "updates", "time-to-quality"])
    run.main()
    assert log == [("time-to-quality", False, "cpu")]


def test_run_main_refuses_a_device_it_cannot_use(monkeypatch, capsys):
    import run

    monkeypatch.setattr(bench_collection, "rows", lambda *a, **k: pytest.fail("a benchmark ran"))
    devices = ["nope", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    devices += [] if torch.backends.mps.is_available() else ["mps"]
    for device in devices:
        monkeypatch.setattr(sys, "argv", ["run.py", "--device", device, "--only", "collection"])
        with pytest.raises(SystemExit) as exit_info:
            run.main()
        assert exit_info.value.code == 2 and f"--device={device}" in capsys.readouterr().err
