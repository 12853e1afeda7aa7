"""Row 1: sequence sampling, batch 256 x seq_len 64 from a wrapped ring of 1,000,000 transitions.

Ours (ReplayBuffer.sample: index arithmetic plus one block gather per storage dtype, episode flags included) against
the seed notebook's `np.stack([... for i in idxs])` and, when installed (`pip install -e ".[bench]"`), TorchRL's
ReplayBuffer + SliceSampler. Also the bandwidth ours achieves against this machine's plain memcpy.

    python benchmarks/bench_sampling.py [--quick] [--device cuda]
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common import Row, memcpy_gbps, time_per_call
from seed_baseline import SeedReplayBuffer
from worldmodel.replay import ReplayBuffer

BATCH, SEQ_LEN, ACTION_DIM, DONE_PROB = 256, 64, 2, 0.02


def fill(capacity: int, obs_dim: int, write: callable, chunk: int = 100_000) -> None:
    """Feeds capacity + 10% random transitions to `write(obs, action, reward, next_obs, done)`, so the ring wraps."""
    rng = np.random.default_rng(0)
    total = capacity + capacity // 10
    for begin in range(0, total, chunk):
        n = min(chunk, total - begin)
        obs = rng.standard_normal((n, obs_dim), dtype=np.float32)
        action = rng.standard_normal((n, ACTION_DIM), dtype=np.float32)
        write(obs, action, rng.standard_normal(n, dtype=np.float32), obs + 0.01, rng.random(n) < DONE_PROB)


def ours(capacity: int, obs_dim: int, device: str) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, obs_dim, ACTION_DIM, device=device, seed=0)
    fill(capacity, obs_dim, lambda o, a, r, n, d: buffer.extend(o, a, r, n, d, np.zeros_like(d)))
    return buffer


def seed(capacity: int, obs_dim: int) -> SeedReplayBuffer:
    buffer = SeedReplayBuffer(capacity, (obs_dim,), (ACTION_DIM,))

    def write(obs, action, reward, next_obs, done):
        # The seed adds one row at a time; writing in bulk here only makes the setup fast, not the sampling.
        rows = (buffer.ptr + np.arange(len(obs))) % capacity
        buffer.obs_buffer[rows], buffer.action_buffer[rows] = obs, action
        buffer.reward_buffer[rows], buffer.dones_buffer[rows] = reward, done
        buffer.ptr, buffer.size = (buffer.ptr + len(obs)) % capacity, min(buffer.size + len(obs), capacity)

    fill(capacity, obs_dim, write)
    return buffer


def torchrl_sampler(capacity: int, obs_dim: int, cache_values: bool = False):
    """TorchRL's documented way to sample trajectory slices, with its defaults (strict_length=True: only episodes of
    at least SEQ_LEN steps are sampled); None when torchrl is not installed. cache_values=True keeps the episode
    boundaries between calls until the storage changes (any write), instead of finding them again each time."""
    try:
        from tensordict import TensorDict
        from torchrl.data import LazyTensorStorage
        from torchrl.data import ReplayBuffer as TorchRLReplayBuffer
        from torchrl.data.replay_buffers.samplers import SliceSampler
    except ImportError:
        return None
    rb = TorchRLReplayBuffer(storage=LazyTensorStorage(capacity), batch_size=BATCH * SEQ_LEN,
                             sampler=SliceSampler(slice_len=SEQ_LEN, end_key=("next", "done"),
                                                  cache_values=cache_values))  # fmt: skip

    def write(obs, action, reward, next_obs, done):
        n, done = len(obs), torch.from_numpy(done).unsqueeze(-1)
        nxt = {"obs": torch.from_numpy(next_obs), "reward": torch.from_numpy(reward), "done": done,
               "terminated": done, "truncated": torch.zeros_like(done)}  # fmt: skip
        rb.extend(TensorDict({"obs": torch.from_numpy(obs), "action": torch.from_numpy(action),
                              "next": TensorDict(nxt, batch_size=[n])}, batch_size=[n]))  # fmt: skip

    fill(capacity, obs_dim, write)
    return rb


def rows(quick: bool = False, device: str = "cpu") -> Iterator[Row]:
    """Each row as soon as it is measured (see bench_updates.rows)."""
    capacity = 200_000 if quick else 1_000_000
    calls, repeats = (10, 3) if quick else (30, 7)
    memcpy = memcpy_gbps()
    for obs_dim in (4, 64):
        case = f"obs_dim {obs_dim}, batch {BATCH} x {SEQ_LEN}, capacity {capacity:,} (wrapped)"
        baseline = seed(capacity, obs_dim)
        t_seed = time_per_call(lambda: baseline.sample(BATCH, SEQ_LEN), calls, repeats)
        del baseline
        buffer = ours(capacity, obs_dim, "cpu")
        t_ours = time_per_call(lambda: buffer.sample(BATCH, SEQ_LEN), calls, repeats)
        gathered = BATCH * SEQ_LEN * sum(t.shape[1] * t.element_size() for t in buffer.ring.tables.values())
        gbps = gathered / t_ours / 1e9
        notes = {"gathered": f"{gathered / 1e6:.2f} MB", "GB/s": f"{gbps:.1f}", "memcpy GB/s": f"{memcpy:.1f}",
                 "of memcpy": f"{gbps / memcpy:.0%}"}  # fmt: skip
        threads = torch.get_num_threads()
        yield Row("sampling", case, t_ours * 1e3, t_seed * 1e3, "seed np.stack", "ms", False,
                  {**notes, "torch threads": threads})  # fmt: skip
        if threads > 1:  # np.stack copies on one thread, our gather on torch's: the same on one thread each
            torch.set_num_threads(1)
            try:
                t_one = time_per_call(lambda: buffer.sample(BATCH, SEQ_LEN), calls, repeats)
            finally:
                torch.set_num_threads(threads)
            yield Row("sampling", f"{case}, ours on 1 thread as np.stack", t_one * 1e3, t_seed * 1e3, "seed np.stack",
                      "ms", False, {"GB/s": f"{gathered / t_one / 1e9:.1f}"})  # fmt: skip
        del buffer
        for cache in (False, True):  # as in training (rows written between samples), then on a static buffer
            rb = torchrl_sampler(capacity, obs_dim, cache_values=cache)
            if rb is None:
                break
            t_rl = time_per_call(rb.sample, max(calls // 3, 3), repeats)
            name = "TorchRL SliceSampler" + (" (cache_values=True, nothing written between samples)" if cache else "")
            yield Row("sampling", case, t_ours * 1e3, t_rl * 1e3, name, "ms", False)
            del rb
        if torch.device(device).type == "cuda":
            on_gpu = ours(capacity, obs_dim, device)
            t_gpu = time_per_call(lambda: on_gpu.sample(BATCH, SEQ_LEN), calls * 3, repeats, device=device)
            yield Row("sampling", f"{case}, buffer.device={device}", t_gpu * 1e3, t_seed * 1e3, "seed np.stack (CPU)",
                      "ms", False)  # fmt: skip
            del on_gpu


if __name__ == "__main__":
    from run import main

    main(only=["sampling"])
