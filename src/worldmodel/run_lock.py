"""One training process per run directory.

Two processes training in one directory interleave their checkpoints and TensorBoard events, and the second one's
.hydra/ replaces the first one's saved config: the same resume command typed in two terminals, or a sweep continued
while a job of it still runs (a joblib worker left behind by a signal to the sweep's parent alone, a SLURM job not yet
ended). So train.py holds an exclusive lock on `<run dir>/.run.lock` for as long as it works there, and a second
process is refused before Hydra writes anything (worldmodel.cli.PreflightChecks; only a sweep job whose directory
another process took after the sweep started is refused later, in train.py). The lock is flock(2)'s: the kernel
drops it when the process ends, however it ends, so a killed run leaves no stale lock behind. On a filesystem without
locks (ENOLCK, ENOSYS, EOPNOTSUPP: some Lustre mounts) runs go on without one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from worldmodel.errors import WorldModelError

LOCK_FILE = ".run.lock"
#: How long a lock that is taken is tried again before the run is refused: far longer than a probe holds it.
PROBE_GRACE_S = 0.5
NOTHING_CHANGED = "nothing was changed"
#: What a sweep job refused in its own process says instead: Hydra saves a job's config before the job starts.
JOB_CONFIG_REPLACED = ("Hydra had already saved this job's config into its .hydra/ (replacing the running job's "
                       "copy there); its checkpoints and logs were not changed")  # fmt: skip
#: What to do once the process holding a directory has stopped: a single run is resumed, a sweep's job is continued
#: by the sweep's own command (the job's directory alone, resumed with trainer.resume=true, would leave the sweep).
RESUME_RUN = "resume it with trainer.resume=true"
CONTINUE_SWEEP = "continue the sweep: its own command with trainer.resume=auto"

#: Run directories this process holds: {resolved dir: open file descriptor of its lock}.
_held: dict[Path, int] = {}


class RunDirInUse(WorldModelError):
    """Another process holds the run directory's lock."""


def refuse_in_use(run_dir: Path, key: str, then: str = RESUME_RUN) -> None:
    """Raises RunDirInUse if another process holds `run_dir`'s lock. Creates nothing: a run refused later on another
    ground leaves no directory behind."""
    run_dir = Path(run_dir)
    lock = run_dir / LOCK_FILE
    if run_dir.resolve() in _held or not lock.is_file():
        return
    fd = _open(lock, create=False)
    if fd is not None:
        try:
            _try_lock(fd, lock, key, then=then)
        finally:
            os.close(fd)  # closing the descriptor releases the probe's own lock, if it got one


def hold(run_dir: Path, key: str = "hydra.run.dir", changed: str = NOTHING_CHANGED, then: str = RESUME_RUN) -> bool:
    """Locks `run_dir` (made if missing) until `release` or the end of the process. False if this process held it
    already (nothing to release then) or the filesystem has no locks. A refusal says what was `changed`, and what to
    do `then`, once the holder has stopped."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _held:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    fd = _open(lock, create=True)
    if fd is None:
        return False
    try:
        locked = _try_lock(fd, lock, key, changed, then)
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        return False
    _held[run_dir.resolve()] = fd
    return True


def release(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def only_process_in(run_dir: Path, key: str = "hydra.run.dir", changed: str = NOTHING_CHANGED,
                    then: str = RESUME_RUN) -> Iterator[None]:  # fmt: skip
    """Holds `run_dir` for the block (a job of a sweep: the next job's directory is another); a lock this process
    already held (train.py's single run, locked by worldmodel.cli.PreflightChecks) stays held."""
    acquired = hold(run_dir, key, changed, then)
    try:
        yield
    finally:
        if acquired:
            release(run_dir)


def _open(lock: Path, create: bool) -> int | None:
    """The lock file, opened read-write: over NFS, flock is emulated with a write lock, which needs a descriptor open
    for writing. Made with mode 0o666 less the umask, so that the group of a shared run directory can lock it too.
    Where it may only be read (another user made it with a stricter umask), read-only: a local flock still works,
    so a run there is still refused while its owner trains. None where it cannot be opened at all."""
    try:
        return os.open(lock, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    except PermissionError:
        with contextlib.suppress(OSError):
            return os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        pass
    return None


def _try_lock(fd: int, lock: Path, key: str, changed: str = NOTHING_CHANGED, then: str = RESUME_RUN) -> bool:
    """True once locked; False where the filesystem has no locks; RunDirInUse where another process holds it."""
    try:
        _flock_within(fd, PROBE_GRACE_S)
    except BlockingIOError:
        pid = _holder(fd)
        who = f"process {pid}" if pid is not None else "another process"
        raise RunDirInUse(
            f"{key}={lock.parent} is in use: {who} is training in it (it holds {lock}); {changed}. Two "
            "runs in one directory would write over each other's checkpoints and logs. Wait for that run to end, or "
            f"stop it (SIGTERM saves a checkpoint) and then {then}; or choose a new directory (drop the override)."
        ) from None
    except OSError:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks on this filesystem
        return False
    return True


def _flock_within(fd: int, seconds: float) -> None:
    """flock(fd, exclusive), trying again for `seconds` before giving up with BlockingIOError: another process's
    `refuse_in_use` probe holds the lock for an instant, and a run starting then must not be refused for it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _holder(fd: int) -> int | None:
    """The pid holding the flock on fd's file, from /proc/locks (Linux, local filesystems), else None."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line has "->" after the number
            fields = [f for f in fields if f != "->"]
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
                return int(fields[4])
    return None
