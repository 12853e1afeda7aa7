"""Sweeps: readable job directory names, submitit jobs that resume when requeued, every job's values checked before
the first starts, and a pointer to the results.

The OmegaConf resolver `wm.job_dirname`, which names each job's directory (hydra.sweep.subdir in conf/config.yaml),
is registered when this module is imported. Hydra instantiates `SweepCallback` (hydra.callbacks.sweep in
conf/config.yaml) in the process that starts a run or a sweep, and unpickles it in every process that runs jobs
(joblib workers, submitit jobs), so this module, and with it the resolver, is loaded wherever a job directory is named.

Requeue and resume: submitit requeues a SLURM job that is preempted or reaches its time limit, and the requeued job
runs again with the same overrides in the same directory. For sweeps with a submitit launcher, SweepCallback gives
every job the override `trainer.resume=auto` (resume.resume_payload): a first start trains from scratch, a rerun
that finds the job's own checkpoints continues from the newest, and a finished job is left as it is. The same
override continues a local sweep that was stopped (scripts print the command). An explicit trainer.resume=... on the
command line is left as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from worldmodel.config import validate_config
from worldmodel.errors import WorldModelError

log = logging.getLogger(__name__)

#: Longest job directory name before it is cut and given a hash suffix (file systems allow 255 bytes).
MAX_DIRNAME = 160

#: The override SweepCallback adds to the jobs of a submitit sweep.
AUTO_RESUME = "trainer.resume=auto"
#: Launchers whose jobs run on the machine that starts the sweep (SLURM's run on the cluster's nodes).
LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "LocalLauncher", "RayLocalLauncher")

_UNSAFE = re.compile(r"[^A-Za-z0-9._+@-]+")
_LONG_DECIMAL = re.compile(r"(?<![A-Za-z0-9.])\d+\.\d{5,}(?:e-?\d+)?(?![A-Za-z0-9.])")


def job_dirname(num: Any, override_dirname: Any) -> str:
    """`<job num>_<overrides>` with every character that could nest directories or confuse Hydra's command-line
    parser ('/', '=', ',', spaces, brackets, quotes...) replaced by '-'; just `<job num>` when there are no overrides.
    Decimals with more than 4 digits after the point (an Optuna trial's learning rate) are shown to 4 significant
    digits: the job number keeps names unique, and .hydra/overrides.yaml has the exact values.

    `override_dirname` is Hydra's `hydra.job.override_dirname` (sorted overrides, minus
    hydra.job.config.override_dirname.exclude_keys). The result is a valid unquoted Hydra value, so a job can be
    continued as a single run with `hydra.run.dir=<sweep dir>/<name> trainer.resume=true`.
    """
    text = _LONG_DECIMAL.sub(lambda m: f"{float(m.group()):.4g}", str(override_dirname or ""))
    text = _UNSAFE.sub("-", text).strip("-")
    name = f"{num}_{text}" if text else str(num)
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_DIRNAME - 9].rstrip('-_.')}-{digest}"
    return name


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in launch order, for a -m sweep run by Hydra's basic sweeper: the grid of the command
    line's overrides and hydra.sweeper.params, expanded as that sweeper expands it. None for other sweepers: Optuna's
    draws each trial's values when the trial starts."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if sweeper != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    # Unresolved, as the sweeper reads them: resolving `${...}` here would resolve it against this config, not the
    # job's, and cache the value (a ${now:} stamp) for every job copied from it.
    params = OmegaConf.select(config, "hydra.sweeper.params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    arguments = [f"{k}={v}" for k, v in params.items()] + task
    overrides = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def launcher_class(hydra_node: DictConfig | None) -> str:
    """The class name of the launcher in Hydra's own config node (a config's `hydra`, or HydraConfig.get())."""
    return str(OmegaConf.select(hydra_node, "launcher._target_", default="")).rsplit(".", 1)[-1] if hydra_node else ""


def jobs_run_here(config: DictConfig) -> bool:
    """Whether a sweep's jobs run on this machine, so that the devices they ask for must be this machine's."""
    return launcher_class(OmegaConf.select(config, "hydra")) in LOCAL_LAUNCHERS


def continues_sweep(config: DictConfig) -> bool:
    """Whether every job of a sweep gets trainer.resume=auto (from the command line, however written, or a preset):
    each then continues from its own checkpoints, starts where it has none, and is left as it is when finished, so
    the sweep's directory may hold earlier jobs' files. (A sweep's config holds its single-valued overrides.)"""
    return OmegaConf.select(config, "trainer.resume", default=False) == "auto"


def task_config(config: DictConfig) -> DictConfig:
    """A callback's config without its `hydra` node: what the task (scripts/train.py) receives."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


def _check_shared_values(config: DictConfig, here: bool) -> None:
    """A sweeper that draws each job's values as the job starts (Optuna): the values every job shares are checked
    before the first, since each job would fail on them in turn (20 failed trials, or SLURM jobs). An error that
    involves a searched key is left to the trials: some of its values may be fine. A key of the search space that
    the command line fixes (trainer.lr=0.001, as the Optuna sweeper reads its params and then the command line, the
    last value winning) is no longer searched: every trial shares its value."""
    searched = {str(k) for k in OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}}
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    with contextlib.suppress(HydraException):
        for override in OverridesParser.create().parse_overrides(task):
            if override.is_sweep_override():
                searched.add(override.key_or_group)
            else:
                searched.discard(override.key_or_group)
    try:
        validate_config(task_config(config), here=here)
    except OmegaConfBaseException:  # e.g. ${hydra:job.num}, which only a job can resolve: left to the trials
        return
    except WorldModelError as err:
        if getattr(err, "key", None) in searched or any(key in str(err) for key in searched):
            return
        raise WorldModelError(f"every job of this sweep shares this value: {err} No job was started.") from None


def check_sweep_jobs(config: DictConfig) -> None:
    """Validates every job of a basic sweep, so that a bad value in the grid stops the sweep before its first job
    rather than failing its own job after the ones before it have run (hours, on a cluster). Devices are checked
    against this machine only when the jobs run here."""
    loader, here = GlobalHydra.instance().config_loader(), jobs_run_here(config)
    try:
        jobs = sweep_jobs(config)
    except HydraException:
        return  # a grid this sweeper cannot expand: it says so itself
    if jobs is None:
        _check_shared_values(config, here)
        return
    for num, overrides in enumerate(jobs):
        try:
            job = loader.load_sweep_config(config, overrides)
            validate_config(task_config(job), here=here)
        except WorldModelError as err:
            raise WorldModelError(f"sweep job {num} ({' '.join(overrides) or 'no overrides'}): {err} No job was "
                                  "started.") from None  # fmt: skip
        except Exception:  # noqa: BLE001  a job that does not compose or resolve reports that itself when it starts
            # (Hydra would turn the exception into a warning here and drop the check of every later job)
            continue


OmegaConf.register_new_resolver("wm.job_dirname", job_dirname, replace=True)


class SweepCallback(Callback):
    """Requeued submitit jobs resume (see the module docstring); a finished sweep says how to compare its jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        task = config.hydra.overrides.task
        sets_resume = any(o.lstrip("+~").startswith("trainer.resume=") for o in OmegaConf.to_container(task))
        if "submitit" in launcher and not sets_resume:
            # The sweeper reads the jobs' overrides from here (unresolved) after this callback.
            with read_write(config.hydra), open_dict(config.hydra):
                task.append(AUTO_RESUME)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        log.info(
            "Sweep done: %s. Compare the jobs with `tensorboard --logdir %s` (HParams tab) or "
            "`python scripts/summarize.py %s`.",
            sweep_dir, sweep_dir, sweep_dir,
        )  # fmt: skip
