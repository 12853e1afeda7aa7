"""Resuming: which checkpoint a run continues from, and whether its config continues the same experiment.

checkpoint.py writes and reads the files; this module decides. trainer.resume=true continues the newest checkpoint
and refuses a config that differs outside RESUMABLE_CHANGES; trainer.resume=auto (what a continued or requeued
sweep gives every job) does the same where a checkpoint exists and starts fresh where none does.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from worldmodel.checkpoint import CheckpointUnreadable, read_checkpoint, resume_candidates
from worldmodel.errors import WorldModelError

#: Config keys that may change when a run resumes; any other difference from the saved config is refused, since it
#: would silently continue a different experiment (another env, another model shape, another data pipeline).
RESUMABLE_CHANGES = {
    "trainer.steps", "trainer.eval_every", "trainer.log_every", "trainer.checkpoint_every",
    "trainer.keep_checkpoints", "trainer.device", "trainer.progress", "trainer.resume", "trainer.compile",
    "trainer.compile_mode", "trainer.cuda_graph", "buffer.device",
}  # fmt: skip


class RunFinished(Exception):
    """trainer.resume=auto found a run that has already made its trainer.steps updates: nothing is left to do."""

    def __init__(self, path: Path, step: int, metrics: dict):
        self.path, self.step, self.metrics = path, step, metrics
        super().__init__(f"{path}: the run has already made {step} updates")


def resume_payload(run_dir: str | Path, cfg: DictConfig, mmap: bool = False) -> dict | None:
    """What scripts/train.py continues from: None for a fresh start, else load_for_resume's payload.

    trainer.resume=auto, for sweeps that are continued or requeued, resumes where `run_dir` holds a checkpoint
    (step_*.pt, or last.pt alone) and starts fresh where it holds none (a job that never started, or stopped before
    its first checkpoint); a run that has already made trainer.steps updates raises RunFinished."""
    resume = cfg.trainer.resume
    if resume == "auto":
        if not resume_candidates(run_dir):
            return None
        return load_for_resume(run_dir, cfg, mmap=mmap, finished_ok=True)
    return load_for_resume(run_dir, cfg, mmap=mmap) if resume else None


def load_for_resume(run_dir: str | Path, cfg: DictConfig, mmap: bool = False, finished_ok: bool = False) -> dict:
    """The newest checkpoint of `run_dir`, after checking that `cfg` continues the same experiment (mmap: see
    read_checkpoint). With finished_ok, a run with no updates left raises RunFinished instead of an error."""
    found = resume_candidates(run_dir)
    if not found:
        raise WorldModelError(
            f"trainer.resume=true, but {Path(run_dir) / 'checkpoints'} holds no step_*.pt or last.pt checkpoint to "
            "resume from. Point hydra.run.dir at the directory of an earlier run; or, for a run stopped before its "
            "first checkpoint, give trainer.resume=auto, which starts it over in that directory (dropping what it "
            "logged)."
        )
    path = found[-1]
    try:
        payload = read_checkpoint(path, mmap=mmap)
    except CheckpointUnreadable as err:
        if len(found) < 2:
            raise
        raise CheckpointUnreadable(f"{err} The run's previous checkpoint is {found[-2]}: move {path.name} out of "
                                   f"{path.parent} to resume from that one.") from None  # fmt: skip
    diffs = config_differences(payload["config"], OmegaConf.to_container(cfg, resolve=True))
    refused = {k: v for k, v in diffs.items() if k not in RESUMABLE_CHANGES}
    if refused:
        listed = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(refused.items()))
        built = [a.override(k) for k, (a, _) in sorted(refused.items()) if isinstance(a, AbsentDefault)]
        raise WorldModelError(
            f"Cannot resume {path}: the config differs from the saved run in keys that change the experiment "
            f"({listed}). Repeat the original overrides (saved in {Path(run_dir) / '.hydra' / 'overrides.yaml'})"
            + (f", and give {' '.join(built)}: the saved run predates {'that key' if len(built) == 1 else 'those keys'}"
               " and was built with that value" if built else "")
            + f"; only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume."
        )  # fmt: skip
    payload["path"] = str(path)
    if finished_ok and payload["step"] >= cfg.trainer.steps:
        raise RunFinished(path, payload["step"], payload["metrics"])
    check_steps_cover(payload, cfg.trainer.steps)
    return payload


def check_steps_cover(payload: dict, steps: int) -> None:
    """A resumed run must have updates left to make: trainer.steps counts all of them, those already made included.
    (With none left the loop would not run, and neither would the final validation, log and checkpoint.)"""
    done = payload["step"]
    if done >= steps:
        relation = "equals" if done == steps else "is below"
        raise WorldModelError(
            f"trainer.steps={steps} {relation} the {done} updates the resumed run ({payload['path']}) has already done: "
            f"nothing is left to train, and nothing was changed. Give trainer.steps > {done} (it counts every update "
            "of the run, those already made included)."
        )


def config_differences(saved: dict, current: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (saved value, current value)} for every leaf that differs or exists on one side only.

    A key the saved config lacks is not a difference where the current value is the saved node's `_target_` default
    for it: the saved run was built without the key, so with that default. That is how a key added to the code after
    a run was saved (e.g. model.head_layers, whose constructor default is the old behaviour) lets the run resume.
    """
    out = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if key not in saved and (default := _target_default(saved, key)) is not _NO_DEFAULT:
            if default == b:
                continue
            a = AbsentDefault(default)  # tells the user which value resumes the run
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_differences(a, b, f"{name}."))
        elif a != b:
            out[name] = (a, b)
    return out


_NO_DEFAULT = object()


class AbsentDefault(str):
    """A key the saved config lacks, shown as the constructor default the saved run was built with."""

    def __new__(cls, default):
        shown = super().__new__(cls, f"<absent: default {default!r}>")
        shown.default = default
        return shown

    def override(self, key: str) -> str:
        """key=<default>, as a command line gives it."""
        value = self.default
        return f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"


def _target_default(node: dict, key: str):
    """The default of parameter `key` of the node's `_target_` callable, or _NO_DEFAULT where there is none to find."""
    try:
        module, _, name = node["_target_"].rpartition(".")
        parameter = inspect.signature(getattr(importlib.import_module(module), name)).parameters.get(key)
    except (KeyError, TypeError, ValueError, ImportError, AttributeError):
        return _NO_DEFAULT
    return _NO_DEFAULT if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
