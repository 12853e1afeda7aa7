"""Checkpoints: the whole training state, written atomically, so a run can stop at any moment and continue.

Layout in a run directory:
    checkpoints/step_00001000.pt   periodic (trainer.checkpoint_every), at the end, and on SIGTERM/SIGINT; the newest
                                   trainer.keep_checkpoints are kept
    checkpoints/last.pt            the final state of a finished run (a hard link to its last step file)

Each file holds model (normalizer included), optimizer, replay buffer, collector (env, episode in progress, policy
RNG), global RNGs, the trainer's counters and the resolved config. `load_world_model` needs only the model part.
Whether a run may continue from one is resume.py's decision.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from worldmodel.errors import WorldModelError
from worldmodel.models import WorldModel

FORMAT_VERSION = 1
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where a finished run keeps its final checkpoint: <run dir>/checkpoints/last.pt."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every periodic checkpoint in a run directory, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := STEP_FILE.match(p.name))]
    return sorted(found)


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints a resume may read, oldest first: the step files, or last.pt alone where a finished run's step
    files were deleted (last.pt is a hard link to its final one, so it holds the same state)."""
    steps = [p for _, p in step_checkpoints(run_dir)]
    last = last_checkpoint(run_dir)
    return steps or ([last] if last.is_file() else [])


def atomic_torch_save(payload: dict, path: Path) -> None:
    """Temporary file, fsync, rename: a kill at any instant leaves either the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk would stay full of the half-written file until the next run
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: DictConfig, env_spec, keep: int = 3):
        self.run_dir, self.keep = Path(run_dir), int(keep)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.env_spec = vars(env_spec)
        _remove_stale_tmp(self.run_dir)

    def save(self, state: dict, step: int, final: bool = False) -> Path:
        payload = {"format_version": FORMAT_VERSION, "step": step, "config": self.config, "env_spec": self.env_spec}
        path = self.run_dir / "checkpoints" / f"step_{step:08d}.pt"
        try:
            atomic_torch_save({**payload, **state}, path)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError about positions
            raise CheckpointWriteFailed(path, err) from err
        if final:
            finish_checkpoints(self.run_dir, path, self.keep)
        else:
            _prune(self.run_dir, self.keep, path)
        return path


def finish_checkpoints(run_dir: Path, path: Path, keep: int) -> None:
    """last.pt for a finished run's final step file `path`, and only the newest `keep` step files. Nothing changes
    where that is done already, so a run killed in between is finished by its next trainer.resume=auto."""
    _remove_stale_tmp(run_dir)
    last = last_checkpoint(run_dir)
    # A copy (where the file system has no hard links) is compared by content: its inode is its own.
    if not (last.is_file() and (os.path.samefile(last, path) or filecmp.cmp(last, path, shallow=False))):
        tmp = last.with_name(".last.pt.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # no second copy on disk; pruning step files later leaves last.pt intact
        except OSError:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, last)
    _prune(run_dir, keep, path)


def _remove_stale_tmp(run_dir: Path) -> None:
    """What a kill in the middle of a save left: a whole checkpoint's size, under a name no later save may reuse (a
    checkpoint made on SIGTERM is at an update off the trainer.checkpoint_every schedule)."""
    for stale in (Path(run_dir) / "checkpoints").glob(".*.pt.tmp"):
        stale.unlink(missing_ok=True)


def _prune(run_dir: Path, keep: int, path: Path) -> None:
    for _, old in step_checkpoints(run_dir)[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)


class CheckpointWriteFailed(WorldModelError):
    """A checkpoint could not be written (most often: the disk is full). Said with what is left on that disk and
    which checkpoint the run can continue from (`kept`, None if none); the half-written file is already removed. The
    scripts add the command that continues the run, the sweep or the trial (cli.user_errors)."""

    def __init__(self, path: Path, err: Exception):
        self.run_dir = path.parent.parent
        self.kept = next(reversed(resume_candidates(self.run_dir)), None)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**30:.3g} GiB are free there"
        except OSError:
            free = "its free space could not be read"
        need = f"; this run's last checkpoint took {self.kept.stat().st_size / 2**30:.3g} GiB" if self.kept else ""
        then = (f"The run stopped here; its checkpoint {self.kept} is whole" if self.kept else
                "The run stopped before any checkpoint of it was written")  # fmt: skip
        cause = (str(err).splitlines() or [""])[0][:200]
        super().__init__(f"Could not write checkpoint {path} ({type(err).__name__}: {cause}); {free}{need}. {then}. "
                         "Each checkpoint holds the replay buffer's stored rows; trainer.keep_checkpoints=1 keeps only "
                         "the newest.")  # fmt: skip


class CheckpointUnreadable(WorldModelError):
    """A checkpoint file that exists but cannot be read: empty, truncated or not a torch.save file."""


def require_checkpoint(path: str | Path) -> Path:
    """`path`, or an error saying that no readable checkpoint is there. Reading a zip's table of contents (what
    torch.save writes, at the end of the file) costs microseconds and catches an empty or truncated file before a
    script starts any work."""
    path = Path(path)
    if path.is_dir():
        # A run directory, or its checkpoints/ folder: the final checkpoint first, else the newest.
        newest = [p for _, p in reversed(step_checkpoints(path))] + sorted(path.glob("step_*.pt"), reverse=True)
        inside = [p for p in [last_checkpoint(path), path / "last.pt", *newest] if p.is_file()]
        hint = f", such as {inside[0]}" if inside else " (a finished run writes <run dir>/checkpoints/last.pt)"
        raise WorldModelError(f"Checkpoint {path} is a directory; give a checkpoint file{hint}.")
    if not path.is_file():
        raise WorldModelError(f"Checkpoint {path} does not exist; a finished run writes <run dir>/checkpoints/last.pt.")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointUnreadable(f"Checkpoint {path} is unreadable or truncated ({path.stat().st_size} bytes: "
                                   f"{err}).") from None  # fmt: skip
    return path


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint's payload. mmap=True maps its tensors (the replay buffer is most of a checkpoint) instead of
    reading them: for checks that only look at the config, for the model alone, and for a resume, which copies the
    buffer from the file into its ring (and must then let go of every mapped tensor: Trainer._restore)."""
    path = require_checkpoint(path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointUnreadable(f"Checkpoint {path} is unreadable or truncated ({type(err).__name__}: "
                                   f"{(str(err).splitlines() or [''])[0][:200]}).") from None  # fmt: skip
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise WorldModelError(f"Checkpoint {path} was not written by this version of worldmodel.")
    return payload


def load_world_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[WorldModel, dict]:
    """Rebuilds the model from the checkpoint's own config, so no config needs to be passed alongside it. The file is
    mapped, not read: the replay buffer it also holds (most of its size) is never loaded, let alone onto `device`."""
    payload = read_checkpoint(path, mmap=True)
    spec = payload["env_spec"]
    model = instantiate(payload["config"]["model"], obs_dim=spec["obs_dim"], action_dim=spec["action_dim"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), payload
