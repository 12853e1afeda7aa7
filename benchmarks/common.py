"""What every benchmark shares: a timer, the machine's memcpy bandwidth, a description of the machine, the table.

A row always measures ours and its baseline in the same process, one right after the other, so the ratio holds
for the machine it ran on even when absolute numbers move with load. Timings are the median of several repeats
(collection: the best of a few, for both sides alike).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class Row:
    bench: str  # which benchmark: sampling, collection, updates, time-to-quality
    case: str  # what was measured, e.g. "obs_dim 4, batch 256 x 64, capacity 1M"
    ours: float
    baseline: float
    baseline_name: str
    unit: str  # of ours and baseline
    higher_is_better: bool
    notes: dict = field(default_factory=dict)  # extra numbers (GB/s, GPU busy fraction, ...)

    @property
    def ratio(self) -> float:
        """How many times better ours is than the baseline (> 1 is better, whichever way the unit points)."""
        if self.higher_is_better:
            return self.ours / self.baseline
        return self.baseline / self.ours


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn: Callable[[], object], calls: int, repeats: int = 5, warmup: int = 3,
                  device: torch.device | str | None = None) -> float:  # fmt: skip
    """Median over `repeats` of the mean seconds per call of `fn` (CUDA work is waited for before the clock stops)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def page_faults(fn: Callable[[], object], calls: int) -> float | None:
    """Minor page faults per call of `fn` (fresh memory the kernel had to hand over and zero), or None where the OS
    does not count them. A steady training step should need none: every fault is a cost the step pays again."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def gpu_busy(fn: Callable[[], object], calls: int, device: torch.device | str) -> float:
    """Share of the time the GPU was executing (kernels, copies, memsets) while `fn` ran `calls` times, from the
    first device activity to the last, as recorded by the CUDA profiler. 1.0 means the host never kept it waiting.
    The profiler's own CPU overhead can only lower this number: it is a lower bound."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == DeviceType.CUDA and not e.is_user_annotation]  # fmt: skip
    return busy_share(spans)


def busy_share(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans over the span from the earliest start to the latest end."""
    if not spans:
        return 0.0
    spans = sorted(spans)
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return busy / max(max(end for _, end in spans) - spans[0][0], 1e-12)


def memcpy_gbps(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Plain host memcpy bandwidth (bytes copied per second, in GB/s): the ceiling for any gather on this machine."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def print_table(rows: list[Row]) -> None:
    print(f"\nmachine: {machine()}\n")
    print("| benchmark | case | ours | baseline | ratio (x better) | notes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(table_line(r))


def table_line(r: Row) -> str:
    """One row of the markdown table."""
    notes = ", ".join(f"{k} {v}" for k, v in r.notes.items())
    return (f"| {r.bench} | {r.case} | {fmt(r.ours)} {r.unit} | {fmt(r.baseline)} {r.unit} ({r.baseline_name}) "
            f"| {r.ratio:.2f} | {notes} |")  # fmt: skip


def fmt(x: float) -> str:
    if x == float("inf"):
        return "inf"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def write_json(rows: list[Row], path: str) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine(), "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]}, f, indent=2)
