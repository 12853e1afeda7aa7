"""The benchmarks' building blocks run against the current API (no timings here: benchmarks are never tests)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_collection  # noqa: E402
import bench_sampling  # noqa: E402
import bench_time_to_quality  # noqa: E402
import bench_updates  # noqa: E402
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
