"""runtime.py's host checks and process-wide settings: device choice, free memory, flush-to-zero and stop signals."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
import torch

from worldmodel import runtime
from worldmodel.runtime import StopSignals, cgroup_memory_room, flush_denormals, free_memory, resolve_device


def test_auto_follows_the_device_it_is_given():
    """buffer.device=auto means the trainer's device, whatever this machine has (a cpu trainer on a GPU machine keeps
    its buffer on the host); meta stands in for a device this machine would not pick."""
    meta = torch.device("meta")
    assert resolve_device("auto", "buffer.device", auto=meta) == meta
    assert resolve_device("auto", "buffer.device", auto=torch.device("cpu")) == torch.device("cpu")


def test_free_host_memory_is_capped_by_the_cgroups_room(monkeypatch):
    """The smaller of MemAvailable and the cgroup's room counts: the cgroup's OOM killer ends a run whatever the
    machine has."""
    monkeypatch.setattr(runtime, "cgroup_memory_room", lambda: 12345)
    assert free_memory(torch.device("cpu")) == 12345


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="no /proc/meminfo here")
def test_free_host_memory_is_in_bytes(monkeypatch):
    """/proc/meminfo counts in kB; free_memory answers in bytes (MemAvailable moves between two reads, but not by
    a factor of 1024)."""
    monkeypatch.setattr(runtime, "cgroup_memory_room", lambda: None)
    kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
              if line.startswith("MemAvailable:"))  # fmt: skip
    assert free_memory(torch.device("cpu")) == pytest.approx(kb * 1024, rel=0.5)


def test_a_cgroup_over_its_limit_has_no_room_left(tmp_path):
    """Usage can exceed a limit lowered under it (or count page cache the kernel has yet to reclaim): room is 0,
    never a negative number of bytes."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(f"30 25 0:26 / {tmp_path}/cg rw,nosuid - cgroup2 cgroup2 rw\n")
    (proc / "cgroup").write_text("0::/job\n")
    (tmp_path / "cg" / "job").mkdir(parents=True)
    (tmp_path / "cg" / "job" / "memory.max").write_text("1000\n")
    (tmp_path / "cg" / "job" / "memory.current").write_text("4000\n")
    assert cgroup_memory_room(proc) == 0


def subnormals_flushed() -> bool:
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@pytest.mark.parametrize("before", [False, True])
def test_flush_denormals_flushes_inside_and_restores_the_setting_after(before):
    """The setting is process-wide: left on, it changed hypothesis' float strategies in later tests."""
    torch.set_flush_denormal(before)
    try:
        with flush_denormals():
            assert subnormals_flushed()
        assert subnormals_flushed() == before
    finally:
        torch.set_flush_denormal(False)


def test_a_second_ctrl_c_interrupts_at_once_and_a_second_sigterm_does_not():
    """The first signal only sets the flag (the loop checkpoints and exits); a second Ctrl-C is a user who will not
    wait, while SLURM may send SIGTERM more than once."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are only installed in the main thread")
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:  # caught here: escaping, it would stop the whole pytest session
            pytest.fail("a second SIGTERM interrupted")
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_stop_signals_give_back_the_previous_handlers():
    """After training, Ctrl-C and SIGTERM act as before (a notebook or a caller's own handlers), not as a flag no
    one reads any more."""
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals():
        assert all(signal.getsignal(s) != before[s] for s in StopSignals.SIGNALS)
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before
