"""One training process per run directory (worldmodel/run_lock.py): a second one is refused before it writes."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
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


def test_a_lock_held_for_an_instant_as_another_runs_probe_holds_it_does_not_refuse_the_run(tmp_path):
    """refuse_in_use probes by taking the lock and letting go at once: a run taking the lock in that instant must
    wait for the probe, not be refused naming the probing process."""
    other = other_process_holds(tmp_path / LOCK_FILE)
    threading.Timer(0.05, other.stdin.close).start()  # the holder lets go once its input ends
    try:
        assert hold(tmp_path)
    finally:
        release(tmp_path)
        other.wait()


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
            assert "nothing was changed" in message and "resume it with trainer.resume=true" in message
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
        # The job is continued with its sweep, not resumed alone (which would leave it outside the sweep).
        assert "continue the sweep: its own command with trainer.resume=auto" in err and "resume=true" not in err
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


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd (Linux)")
def test_a_refused_or_unlocked_hold_leaves_no_descriptor_open(tmp_path, monkeypatch):
    """A sweep's jobs run one after another in one process (basic launcher, a reused joblib worker): a descriptor
    left open by each refused or lock-less hold would pile up for the whole sweep."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = other_process_holds(run_dir / LOCK_FILE)
    try:
        before = _open_fds()
        with pytest.raises(RunDirInUse):
            hold(run_dir)
        assert _open_fds() == before
    finally:
        other.kill()
        other.wait()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = _open_fds()
    assert not hold(run_dir)
    assert _open_fds() == before and not run_lock._held


def test_a_relative_or_symlinked_run_dir_is_one_directory(tmp_path, monkeypatch):
    """hydra.run.dir is often relative (outputs/...), and train.py sees it as Hydra's absolute output_dir: both name
    the one lock this process holds, as does a symlink to it."""
    (tmp_path / "run").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert hold(Path("run"))
    try:
        assert tmp_path.resolve() / "run" in run_lock._held
        refuse_in_use(tmp_path / "link", "hydra.run.dir")  # this process's own lock, under another name
        with only_process_in(tmp_path / "run"):  # train.py inside the single run: the lock stays held after it
            pass
        assert not lockable_by_another_process(tmp_path / "run" / LOCK_FILE)
    finally:
        release(tmp_path / "link")
    assert lockable_by_another_process(tmp_path / "run" / LOCK_FILE) and not run_lock._held


def test_a_lock_file_this_process_may_not_open_leaves_the_run_unlocked(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).touch()

    def not_allowed(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(run_lock.os, "open", not_allowed)
    refuse_in_use(run_dir, "hydra.run.dir")
    assert not hold(run_dir) and not run_lock._held


def test_a_lock_file_another_user_made_read_only_still_refuses_while_its_owner_trains(tmp_path, monkeypatch):
    """Two users of a shared run directory: the lock file the first made is read-only to the second (a strict umask).
    Opened read-only, it still shows the first user's lock, so the second is refused rather than left unlocked.
    (The tests run as root, whom file modes do not stop: a read-write open is refused here by hand.)"""
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    other = other_process_holds(tmp_path / LOCK_FILE)
    try:
        monkeypatch.setattr(run_lock.os, "open", read_only)
        for check in (lambda: refuse_in_use(tmp_path, "hydra.run.dir"), lambda: hold(tmp_path)):
            with pytest.raises(RunDirInUse, match=f"is in use: process {other.pid}"):
                check()
    finally:
        other.kill()
        other.wait()
    assert not run_lock._held


def test_a_new_lock_file_is_as_writable_as_the_umask_allows(tmp_path):
    """Made 0o666 less the umask: with a group-sharing umask (0o002), the group's other users can lock it too."""
    before = os.umask(0o002)
    try:
        with only_process_in(tmp_path / "run"):
            mode = (tmp_path / "run" / LOCK_FILE).stat().st_mode & 0o777
    finally:
        os.umask(before)
    assert mode == 0o664


def test_the_lock_file_is_opened_for_writing(tmp_path, monkeypatch):
    """Over NFS flock is emulated with a write lock, which a descriptor open only for reading cannot take."""
    flags = []
    real_open = os.open

    def spy(path, flag, *args):
        flags.append(flag)
        return real_open(path, flag, *args)

    monkeypatch.setattr(run_lock.os, "open", spy)
    with only_process_in(tmp_path / "run"):
        refuse_in_use(tmp_path / "run", "hydra.run.dir")
    refuse_in_use(tmp_path / "run", "hydra.run.dir")  # the probe of a directory no process holds
    assert len(flags) == 2 and all(flag & os.O_ACCMODE == os.O_RDWR for flag in flags)


def test_the_holder_is_read_from_proc_locks_by_device_and_inode(monkeypatch):
    """/proc/locks writes the device as hex major:minor (08:11 is 8, 17) and lists a blocked waiter ("->") after the
    lock it waits on; a POSIX lock or another file's flock is not the holder."""
    import types

    fake = types.SimpleNamespace(st_dev=os.makedev(8, 17), st_ino=5678)
    real_fstat = os.fstat
    monkeypatch.setattr(run_lock.os, "fstat", lambda fd: fake if fd == -7 else real_fstat(fd))
    locks = ("1: POSIX  ADVISORY  WRITE 111 08:11:5678 0 EOF\n"
             "2: FLOCK  ADVISORY  WRITE 222 08:17:5678 0 EOF\n"
             "3: FLOCK  ADVISORY  WRITE 333 08:11:5679 0 EOF\n"
             "4: FLOCK  ADVISORY  WRITE 1234 08:11:5678 0 EOF\n"
             "4: -> FLOCK  ADVISORY  WRITE 999 08:11:5678 0 EOF\n")  # fmt: skip
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: locks if str(self) == "/proc/locks"
                        else real_read_text(self, *a, **k))  # fmt: skip
    assert run_lock._holder(-7) == 1234
    locks = "".join(locks.splitlines(keepends=True)[:3])  # no holder found: the message says "another process"
    assert run_lock._holder(-7) is None


def _run_config(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"hydra.run.dir={run_dir}", *overrides], return_hydra_config=True)


def test_a_single_run_holds_its_directory_from_its_preflight_checks_on(tmp_path):
    """PreflightChecks locks the run dir before Hydra writes .hydra/ into it, and keeps it until the process ends:
    train.py's own hold then finds it held already."""
    run_dir = tmp_path / "run"
    PreflightChecks().on_run_start(_run_config(run_dir))
    try:
        assert not lockable_by_another_process(run_dir / LOCK_FILE)
        with only_process_in(run_dir):
            pass
        assert not lockable_by_another_process(run_dir / LOCK_FILE)
    finally:
        release(run_dir)


def test_a_running_runs_directory_is_refused_as_in_use_before_its_files_are_read(tmp_path, capsys):
    """Its checkpoints are still being written: the error says the run is in use, not that the directory holds
    another run's checkpoints (add trainer.resume=true, which would be refused in turn)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000010.pt").write_bytes(b"")
    other = other_process_holds(run_dir / LOCK_FILE)
    try:
        with pytest.raises(SystemExit) as stop:
            PreflightChecks().on_run_start(_run_config(run_dir))
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"hydra.run.dir={run_dir} is in use: process {other.pid}" in err and "already holds" not in err
    finally:
        other.kill()
        other.wait()
    assert not run_lock._held


def test_a_sweep_whose_nested_job_directory_another_process_holds_is_refused_before_any_job(tmp_path):
    """hydra.sweep.subdir may nest a job's directory deeper than one level: the sweep-wide check still finds its lock,
    before Hydra saves the job's config over the running job's."""
    sweep = tmp_path / "sweep"
    job = sweep / "nested" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=5\n")
    other = other_process_holds(job / LOCK_FILE)
    try:
        subdir = "hydra.sweep.subdir=nested/${hydra.job.num}"
        proc = run_train(["-m", "seed=0", *TINY, f"hydra.sweep.dir={sweep}", subdir], check=False)
    finally:
        other.kill()
        other.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"a job of hydra.sweep.dir: hydra.run.dir={job} is in use: process {other.pid}" in proc.stderr
    assert (job / ".hydra" / "overrides.yaml").read_text() == "- seed=5\n"
    assert not list(job.glob("events.out.tfevents.*")) and not (job / "checkpoints").exists()


def test_a_sweep_job_refused_in_its_own_process_says_what_hydra_had_written(tmp_path):
    """A job whose directory another process took after the sweep-wide check is refused by train.py's own lock, once
    Hydra has saved the job's config there: the error says so, rather than "nothing was changed"."""
    other = other_process_holds(tmp_path / LOCK_FILE)
    try:
        with pytest.raises(RunDirInUse) as refused, only_process_in(tmp_path, changed=run_lock.JOB_CONFIG_REPLACED,
                                                                    then=run_lock.CONTINUE_SWEEP):
            pass
    finally:
        other.kill()
        other.wait()
    message = str(refused.value)
    assert "Hydra had already saved this job's config into its .hydra/" in message
    assert "nothing was changed" not in message
    assert "continue the sweep" in message and "resume=true" not in message
