"""Seeding, device choice, RNG state for checkpoints and stop signals: what every entry point needs first."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from worldmodel.errors import ConfigError

#: Held-out validation episodes come from an env seeded this far from the run's seed, so no sweep over nearby seeds
#: ever trains one run on another run's validation episodes.
VAL_SEED_OFFSET = 1_000_003
#: scripts/collect.py seeds its env and policy this far from its `seed`, so a dataset never holds the episodes of a
#: training run (or of its validation) seeded nearby: evaluating a seed-0 model on a seed-0 dataset is not scoring it
#: on its own training data.
DATASET_SEED_OFFSET = 2_000_003


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str, key: str = "trainer.device", auto: torch.device | None = None,
                   here: bool = True) -> torch.device:  # fmt: skip
    """`auto` means `auto` when given (e.g. the trainer's device for buffer.device), else cuda when available, else
    cpu; asking for an accelerator that is not there is an error (naming config `key`). With here=False (a config
    for jobs that run on other machines) only the name is checked, not what this machine has."""
    name = str(name)
    if name == "auto":
        return auto if auto is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(key, name, "one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(key, name, "one of auto, cpu, cuda, cuda:N, mps")
    if not here:
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, name, "auto or cpu: this machine has no CUDA device visible to torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(key, name, f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(key, name, "auto or cpu: MPS is not available on this machine")
    return device


def free_memory(device: torch.device) -> int | None:
    """Bytes that `device` can still allocate (None where that cannot be told). For a host: what the kernel reports
    available (page cache included, which it gives back), or less where this process's cgroup caps it (SLURM's --mem,
    docker --memory), since the cgroup's OOM killer ends the run whatever the machine has."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            with open("/proc/meminfo") as meminfo:
                available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
            try:
                room = cgroup_memory_room()
            except (OSError, ValueError, IndexError):  # a layout not foreseen: the machine's figure alone
                room = None
            return available if room is None else min(available, room)
    except (OSError, RuntimeError, StopIteration):  # no /proc (macOS), a CUDA query that fails
        pass
    return None


def cgroup_memory_room(proc: Path = Path("/proc/self")) -> int | None:
    """Limit minus usage of this process's memory cgroup and of each one above it (the smallest), in cgroup v2 or v1;
    None where no limit is set. Paths come from proc/mountinfo and proc/cgroup, as a container or a job sees them."""
    mounts = {}  # "v1" / "v2" -> (the hierarchy's path at the mount, the mount point)
    for line in (proc / "mountinfo").read_text().splitlines():
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3]
        if fstype == "cgroup2" or (fstype == "cgroup" and "memory" in options.split(",")):
            mounts.setdefault("v2" if fstype == "cgroup2" else "v1", (fields[3], Path(fields[4])))
    files = {"v2": ("memory.max", "memory.current"), "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes")}
    rooms = []
    for line in (proc / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
        if version not in mounts:
            continue
        root, point = mounts[version]
        inside = os.path.relpath(path, root) if (path + "/").startswith(root.rstrip("/") + "/") else "."
        limit_file, usage_file = files[version]
        for level in [point / inside, *(point / inside).parents]:
            try:
                limit, usage = (level / limit_file).read_text().strip(), int((level / usage_file).read_text())
            except (OSError, ValueError):
                limit = "max"
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a number near 2**63
                rooms.append(int(limit) - usage)
            if level == point:
                break
    return max(0, min(rooms)) if rooms else None


def rng_state(cuda: bool = True) -> dict:
    """Every global random stream (python, numpy, torch CPU and CUDA), in a form torch.save(weights_only) accepts.
    cuda=False leaves the CUDA streams out: reading them initialises CUDA, which a host-only script should not pay."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {
        "python": random.getstate(),
        "numpy": np_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def flush_denormals():
    """Subnormal floats flushed to zero inside the block, as it was before after it. Late in training many values
    become subnormal, which CPUs process ~1.5x slower; flushing them left every loss bit-identical in our runs. The
    setting is process-wide (it would change, say, hypothesis' float strategies in the same process), and torch has
    no getter for it: whether a subnormal times one comes out 0 tells."""
    was = bool(torch.tensor([1e-39]).mul(1.0).item() == 0.0)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


class StopSignals:
    """Turns SIGTERM (SLURM preemption, `kill`) and SIGINT (Ctrl-C) into a flag the training loop checks after each
    update, so it can checkpoint and exit cleanly. A second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
