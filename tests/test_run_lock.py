"""One training process per run directory (worldmodel/run_lock.py): a second one is refused before it writes."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, run_train, start_train
from hydra import compose, initialize_config_dir
from test_resume import wait_for

from worldmodel import run_lock
from worldmodel.cli import PreflightChecks
from worldmodel.run_lock import LOCK_FILE, RunDirInUse, hold, only_process_in, refuse_in_use, release

# Another process holding a run dir's lock, as train.py would, without the cost of starting torch.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def other_process_holds(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def lockable_by_another_process(lock: Path) -> bool:
    code = "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    return subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True).returncode == 0


def test_a_directory_another_process_holds_is_refused_and_freed_when_that_process_dies(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = other_process_holds(run_dir / LOCK_FILE)
    try:
        for check in (lambda: refuse_in_use(run_dir, "hydra.run.dir"), lambda: hold(run_dir)):
            with pytest.raises(RunDirInUse) as refused:
                check()
            message = str(refused.value)
            assert message.startswith(f"hydra.run.dir={run_dir} is in use: process {other.pid} is training in it")
            assert "nothing was changed" in message
        assert run_dir.resolve() not in run_lock._held
    finally:
        other.kill()  # SIGKILL: no chance to clean up, and still no stale lock
        other.wait()
    refuse_in_use(run_dir, "hydra.run.dir")
    assert hold(run_dir)
    release(run_dir)


def test_hold_makes_the_directory_keeps_one_lock_per_process_and_release_frees_it(tmp_path):
    run_dir = tmp_path / "a" / "run"
    refuse_in_use(run_dir, "hydra.run.dir")
    assert not run_dir.exists()  # the check alone makes nothing: a run refused later leaves no directory
    assert hold(run_dir) and (run_dir / LOCK_FILE).is_file()
    try:
        assert not lockable_by_another_process(run_dir / LOCK_FILE)
        refuse_in_use(run_dir, "hydra.run.dir")  # this process's own lock is no other run's
        assert not hold(run_dir)  # held already: nothing more to release
        with only_process_in(run_dir):  # train.py inside a single run PreflightChecks locked
            pass
        assert not lockable_by_another_process(run_dir / LOCK_FILE)  # still held: the block did not take it
    finally:
        release(run_dir)
    assert lockable_by_another_process(run_dir / LOCK_FILE)
    with only_process_in(run_dir):  # a sweep job: held for the block, freed after it
        assert not lockable_by_another_process(run_dir / LOCK_FILE)
    assert lockable_by_another_process(run_dir / LOCK_FILE) and not run_lock._held


def test_a_filesystem_without_locks_runs_unlocked(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert not hold(tmp_path / "run")
    refuse_in_use(tmp_path / "run", "hydra.run.dir")
    with only_process_in(tmp_path / "run"):
        pass
    assert not run_lock._held


def test_continuing_a_sweep_while_one_of_its_jobs_runs_is_refused(tmp_path, capsys):
    """A signal to a joblib sweep's parent alone leaves its workers training: the sweep's own continue command, run
    then, would start those jobs a second time in their directories."""
    job = tmp_path / "0_seed-0"
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "step_00000010.pt").write_bytes(b"")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.sweep.dir={tmp_path}", "trainer.resume=auto"],
                      return_hydra_config=True)  # fmt: skip
    other = other_process_holds(job / LOCK_FILE)
    try:
        with pytest.raises(SystemExit) as stop:
            PreflightChecks().on_multirun_start(cfg)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"a job of hydra.sweep.dir: hydra.run.dir={job} is in use: process {other.pid}" in err
    finally:
        other.kill()
        other.wait()


def test_a_second_run_in_a_running_runs_directory_is_refused_before_it_writes(tmp_path):
    """The same resume command typed twice: the second is refused before Hydra saves its config over the first's, and
    once the first has stopped, the directory resumes."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.steps=20000", "trainer.checkpoint_every=20", f"hydra.run.dir={run_dir}"]
    first = start_train(args)
    try:
        wait_for(run_dir / "checkpoints" / "step_00000020.pt", first)
        saved = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        second = run_train([*args, "trainer.resume=true", "trainer.lr=0.002"], check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"hydra.run.dir={run_dir} is in use: process {first.pid} is training in it" in second.stderr
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == saved
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    done = run_train([*args, "trainer.resume=true", "trainer.steps=" + str(_updates_made(run_dir) + 20)])
    assert "val/loss" in done.stdout


def _updates_made(run_dir: Path) -> int:
    return max(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))
