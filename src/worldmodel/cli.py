"""How scripts treat the user: mistakes are reported as one paragraph with exit code 2, an interrupted run says
how to resume it, and no run's files are ever written over."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import traceback
from pathlib import Path

import gymnasium as gym
import hydra.utils
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from worldmodel.checkpoint import CheckpointWriteFailed, resume_candidates
from worldmodel.config import nearest_existing, refuse_deleted_keys, validate_config
from worldmodel.errors import RunInterrupted, WorldModelError
from worldmodel.resume import RunFinished, resume_payload
from worldmodel.run_lock import CONTINUE_SWEEP, LOCK_FILE, hold, refuse_in_use
from worldmodel.sweep import check_sweep_jobs, continues_sweep, launcher_class, task_config

#: Launchers whose jobs run in processes that share the sweep's command line (sys.argv): Hydra's basic one runs them
#: in its own, joblib's workers inherit it. A submitit job's process is submitit's own, even on this machine.
ARGV_LAUNCHERS = ("BasicLauncher", "JoblibLauncher")

#: Set WORLDMODEL_DEBUG=1 to get the full traceback instead.
DEBUG_ENV = "WORLDMODEL_DEBUG"


class JobFailed(Exception):
    """One job of a -m sweep stopped on a mistake or a divergence, reported above; the sweep goes on without it."""


@contextlib.contextmanager
def user_errors(job: bool = True, callback: bool = False, script: str | None = None):
    """Reports a WorldModelError as one paragraph and exits with code 2: sys.exit, not an exception, since Hydra turns
    exceptions raised in callbacks into warnings and prints a traceback for those raised in the task. Inside a job of
    a -m sweep (`job`: not a sweep-wide callback) it raises JobFailed instead: sys.exit would end the whole sweep,
    while a failed job lets the launcher run the others (a diverged Optuna trial is then a failed trial). With
    WORLDMODEL_DEBUG set the error is raised with its traceback, except in a `callback`, where Hydra would make it a
    warning and go on: there the traceback is printed and the script still exits. For the same reason, in a
    `callback` any other exception also ends the script (with its traceback), before Hydra writes the run dir.
    `script`: the path of the script that runs the task, for the command that resumes it (in a submitit job,
    sys.argv[0] is submitit's own)."""
    try:
        yield
    except (WorldModelError, InstantiationException, gym.error.DependencyNotInstalled, OmegaConfBaseException) as err:
        mistake = _as_user_error(err)
        if os.environ.get(DEBUG_ENV) and callback and isinstance(mistake, WorldModelError):
            _say(traceback.format_exc().rstrip())
            sys.exit(2)
        if os.environ.get(DEBUG_ENV) or not isinstance(mistake, WorldModelError):
            if callback:
                _exit_from_callback()
            raise
        text = str(mistake)
        if isinstance(mistake, CheckpointWriteFailed):
            text += f"\n{_after_failed_save(mistake, _sweep_job() if job else None, script)}"
        _say(f"error: {text}\n(set {DEBUG_ENV}=1 for the traceback)")
        if job and _sweep_job() is not None:
            raise JobFailed(text) from None
        sys.exit(2)
    except RunInterrupted as stop:
        _say(_stopped_message(stop, _sweep_job() if job else None, script))
        sys.exit(128 + stop.signum)
    except Exception:
        if not callback:
            raise
        _exit_from_callback()


def _as_user_error(err: Exception) -> Exception:
    """The user's mistake behind `err`, as a WorldModelError where it is one."""
    # hydra.utils.instantiate wraps what a constructor raises (make_env's check of the env's spaces, a dataset that
    # does not fit) in its own exception: the user's mistake is the cause.
    mistake = err.__cause__ if isinstance(err, InstantiationException) else err
    if isinstance(mistake, gym.error.DependencyNotInstalled):  # raised after make_env, e.g. at the first reset
        return WorldModelError(f"The env needs a package that is not installed ({mistake}). env.id and env.kwargs "
                               "decide what it needs (render_mode=human, say, needs pygame).")  # fmt: skip
    if isinstance(mistake, OmegaConfBaseException):  # a ??? left unset, a broken ${...}, a key removed with ~
        key = getattr(mistake, "full_key", None)
        where, give = (f" at `{key}`", f" on the command line ({key}=...)") if key else ("", "")
        return WorldModelError(f"The config has no usable value{where}: {str(mistake).splitlines()[0]}. Give it one"
                               f"{give}, or drop the override that removed or broke it; nothing was run.")  # fmt: skip
    return mistake


def _exit_from_callback() -> None:
    """An unexpected error in a check made before the run: Hydra would print it as a warning and go on to write the
    run directory, over what may be another run's saved config."""
    _say(f"{traceback.format_exc()}error: the checks made before the run failed on the error above; nothing was "
         "written.")  # fmt: skip
    sys.exit(2)


def _say(text: str) -> None:
    """Prints to stderr as far as it can: with the reader of a pipe gone (`2>&1 | true`) the print raises, and the
    exit after it must still happen. In a Hydra callback an exception is only a warning: the refused run would go on
    to write its directory, over another run's."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _stopped_message(stop: RunInterrupted, sweep: DictConfig | None, script: str | None = None) -> str:
    """What to do after a stop by SIGTERM/SIGINT: the command that continues the run, the sweep or the trial.
    `sweep`: Hydra's own config when this is a job of a -m sweep."""
    run_dir = Path(stop.checkpoint).parent.parent if stop.checkpoint else None
    storage = OmegaConf.select(sweep, "sweeper.storage") if sweep is not None else None
    if storage is not None and run_dir is not None:
        # An Optuna study kept in storage: rerun, the sweeper reloads it and adds n_trials new trials (numbered from
        # job 0 again, so finished jobs would be counted twice) and this trial stays RUNNING in it. So only this
        # trial's training is offered, as a single run.
        return (f"Stopped by signal {stop.signum} after update {stop.step} of this trial ({stop.checkpoint}); the "
                f"study in {storage} keeps the trial as RUNNING, and its later trials did not start. Continue this "
                f"trial's training alone with:\n  {resume_command(run_dir, script)}\nA rerun of the sweep command adds "
                "hydra.sweeper.n_trials new trials to the study (give it another hydra.sweeper.sampler.seed and "
                "hydra.sweep.dir).")  # fmt: skip
    if _ends_the_sweep(sweep):
        saved = f" (checkpoint: {stop.checkpoint})" if stop.checkpoint else ""
        return (f"Stopped by signal {stop.signum} after update {stop.step} of this sweep job{saved}; the sweep's "
                f"later jobs did not start.\nContinue the sweep with:\n  {_sweep_command(sweep)}")  # fmt: skip
    if run_dir is None:  # stopped during the prefill: nothing trained, nothing saved, nothing logged
        return (f"Stopped by signal {stop.signum} during the prefill, before the first update: there is nothing to "
                "resume. Run the same command again to start over (its run directory, if you named it, takes the "
                "new run).")  # fmt: skip
    return (f"Stopped by signal {stop.signum} after update {stop.step}; the full state is in {stop.checkpoint}.\n"
            f"Resume with:\n  {resume_command(run_dir, script)}")


def _after_failed_save(err: CheckpointWriteFailed, sweep: DictConfig | None, script: str | None) -> str:
    """What to run once there is room again: as after a stop, the sweep's own command for a local sweep, else this
    run's (a trial's) own, which trainer.resume=auto starts over where no checkpoint was written."""
    if _ends_the_sweep(sweep):
        return f"Make room, then continue the sweep with:\n  {_sweep_command(sweep)}"
    if err.kept is None:
        return f"Make room, then start it over with:\n  {resume_command(err.run_dir, script, resume='auto')}"
    return f"Make room, then continue from {err.kept.name} with:\n  {resume_command(err.run_dir, script)}"


def _ends_the_sweep(sweep: DictConfig | None) -> bool:
    """A job of a local sweep (basic, joblib), whose study is not kept in storage: it runs in the sweep's process (or
    in workers given its command line), so a job that ends the process ends the sweep, and the jobs after it never
    start. The sweep's own command line, with trainer.resume=auto, continues this job and runs the others. (A SLURM
    job's process is submitit's; an Optuna study in storage would add new trials on a rerun.)"""
    if sweep is None:
        return False
    return OmegaConf.select(sweep, "sweeper.storage") is None and launcher_class(sweep) in ARGV_LAUNCHERS


def _sweep_command(sweep: DictConfig) -> str:
    """The sweep's own command line, in its directory, with trainer.resume=auto."""
    skip = ("hydra.sweep.dir=", "trainer.resume=")
    args = [a for a in sys.argv[1:] if not a.lstrip("+~").startswith(skip)]
    return shlex.join(["python", sys.argv[0], *args, f"hydra.sweep.dir={sweep.sweep.dir}", "trainer.resume=auto"])


def _sweep_job() -> DictConfig | None:
    """Hydra's own config (HydraConfig.get()) when this process runs a job of a -m sweep, else None."""
    return HydraConfig.get() if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN else None


#: Hydra overrides that say where a run or sweep goes and how a sweep runs: a resume names its own directory and runs
#: alone. Others (hydra.job.name, hydra.searchpath, hydra/job_logging...) compose the run and are kept.
RUN_PLACEMENT = ("hydra.run.dir=", "hydra.mode=", "hydra.sweep.", "hydra.job.num=", "hydra.job.id=", "hydra.sweeper",
                 "hydra/sweeper", "hydra.launcher", "hydra/launcher")  # fmt: skip


def resume_command(run_dir: Path | None, script: str | None = None, resume: str = "true") -> str:
    """The command line that continues this run: its config flags and overrides, its directory, trainer.resume=true
    (auto: start over there where no checkpoint is). Hydra's overrides leave out --config-dir and --config-name,
    without which a run composed from a config of its own (env=mycart in --config-dir) would not compose again."""
    hydra = HydraConfig.get()
    flags = [f"--config-dir={s.path}" for s in hydra.runtime.config_sources if s.provider == "command-line"]
    if hydra.job.config_name not in (None, "config"):
        flags.append(f"--config-name={hydra.job.config_name}")
    own = [o for o in hydra.overrides.hydra if not o.startswith(RUN_PLACEMENT)]
    task = [o for o in hydra.overrides.task if not o.startswith("trainer.resume=")]
    args = [*flags, *task, *own, f"hydra.run.dir={run_dir}", f"trainer.resume={resume}"]
    return shlex.join(["python", script or sys.argv[0], *args])


class PreflightChecks(Callback):
    """Checks a run before Hydra writes anything into its directory.

    Hydra saves .hydra/config.yaml and overrides.yaml into the output directory before the task starts, so a check
    made inside the task comes too late to leave an existing run's directory untouched. Here, in on_run_start, it
    refuses bad values, a directory another train.py process is working in (run_lock.py; this one then holds its
    lock until it ends), a directory holding another run's checkpoints (unless trainer.resume=true) or, without
    checkpoints, its TensorBoard logs (a run stopped before its first checkpoint), and a resume
    whose config would change the experiment (trainer.resume=auto: a resume where checkpoints are, a fresh start
    where none are). For sweeps, on_multirun_start refuses a sweep directory in which a job is still running, or
    that holds earlier jobs' checkpoints (unless trainer.resume=auto continues that sweep) and, for the basic
    sweeper, any job with a bad value, before the first job starts (its values are checked again in the task, as are
    those of an Optuna trial, which are drawn as the trial starts).
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # as Hydra does for the task: the checks may resolve ${hydra:...}
        run_dir = Path(OmegaConf.select(config, "hydra.run.dir"))
        task_cfg = task_config(config)
        found = resume_candidates(run_dir)
        # A run stopped before its first checkpoint left only its logs: a new run there would add its curves to them.
        logs = sorted(run_dir.glob("events.out.tfevents.*")) if run_dir.is_dir() else []
        with user_errors(callback=True):
            _refuse_file(run_dir, "hydra.run.dir")
            refuse_in_use(run_dir, "hydra.run.dir")  # before reading what a running process is writing
            refuse_deleted_keys(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
            validate_config(task_cfg)
            _refuse_other_scripts_dir(run_dir, str(OmegaConf.select(config, "hydra.job.name")))
            auto = task_cfg.trainer.resume == "auto"
            if task_cfg.trainer.resume and (not auto or found):
                with contextlib.suppress(RunFinished):  # auto: train.py says so and exits
                    # Only the saved config is checked here; train.py reads the tensors once, when it resumes.
                    resume_payload(run_dir, task_cfg, mmap=True)
            elif found:
                raise WorldModelError(
                    f"hydra.run.dir={run_dir} already holds another run's checkpoints ({found[-1]}); nothing was "
                    "changed. Add trainer.resume=true to continue that run, or choose a new directory (drop the "
                    "hydra.run.dir override)."
                )
            elif logs and not auto:  # auto starts such a run over (train.py's Logger removes what it logged)
                raise WorldModelError(
                    f"hydra.run.dir={run_dir} already holds another run's TensorBoard logs ({logs[-1].name}), and no "
                    "checkpoint to resume from; nothing was changed. Choose a new directory (drop the hydra.run.dir "
                    "override), or add trainer.resume=auto to start that run over there (what it logged is dropped)."
                )
            hold(run_dir)  # last: a refused run leaves no directory. Held until the process ends (run_lock.py).

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        finished = sorted(sweep_dir.glob("**/checkpoints/*.pt")) if sweep_dir.is_dir() else []
        with user_errors(job=False, callback=True):
            _refuse_file(sweep_dir, "hydra.sweep.dir")
            # A job of this sweep still running (a detached joblib worker, a SLURM job): continuing the sweep would
            # start that job a second time in its directory.
            # (rglob: hydra.sweep.subdir may nest a job's directory deeper.)
            for lock in sorted(sweep_dir.rglob(LOCK_FILE)) if sweep_dir.is_dir() else []:
                refuse_in_use(lock.parent, "a job of hydra.sweep.dir: hydra.run.dir", then=CONTINUE_SWEEP)
            refuse_deleted_keys(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
            _refuse_continuing_a_stored_study(config, sweep_dir)
            if finished and not continues_sweep(config):
                raise WorldModelError(
                    f"hydra.sweep.dir={sweep_dir} already holds checkpoints of {len({p.parent for p in finished})} "
                    f"earlier job(s), e.g. "
                    f"{finished[0]}. Choose a new sweep directory (drop the hydra.sweep.dir override), or add "
                    "trainer.resume=auto to continue that sweep; nothing was changed."
                )
            check_sweep_jobs(config)


def _refuse_continuing_a_stored_study(config: DictConfig, sweep_dir: Path) -> None:
    """trainer.resume=auto in the directory of an Optuna study kept in storage. The sweeper reloads the study and adds
    n_trials new trials, numbered from job 0 again in the same directory: a new trial that drew the values of the
    earlier trial with its number (as a seeded sampler's random startup trials may) would find that trial's finished
    directory and report its result a second time, and the others would mix with the earlier trials' directories.
    (An in-memory study replays its seeded trials instead, so resume=auto continues it.)"""
    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    if storage is None or not continues_sweep(config) or not sweep_dir.is_dir():
        return
    if any((p / ".hydra").is_dir() for p in sweep_dir.iterdir()):  # earlier trials' directories
        raise WorldModelError(
            f"trainer.resume=auto does not continue an Optuna study kept in storage (hydra.sweeper.storage={storage}): "
            f"the sweeper would add hydra.sweeper.n_trials new trials to it, numbered from job 0 again in "
            f"hydra.sweep.dir={sweep_dir}, and a new trial that drew the values of the earlier trial with its number "
            "would report that trial's finished result a second time. Nothing was started. To add trials to the "
            "study, rerun the sweep command without trainer.resume=auto, with a new hydra.sweep.dir and another "
            "hydra.sweeper.sampler.seed; a trial that was stopped continues alone with the command its stop printed."
        )


def _refuse_file(run_dir: Path, key: str) -> None:
    """A run directory that is, or would be made inside, a file (Hydra's makedirs would fail with a traceback)."""
    nearest = nearest_existing(run_dir)
    if not nearest.is_dir():
        raise WorldModelError(f"{key}={run_dir}: {nearest} is a file, not a directory; nothing was changed. Choose a "
                              f"new directory (drop the {key} override).")  # fmt: skip


def _refuse_other_scripts_dir(run_dir: Path, job_name: str) -> None:
    """A directory made by another script (evaluate.py, collect.py) holds no checkpoint or TensorBoard log for the
    checks above to find, but its .hydra/ records what that script was run with, which this run would replace."""
    saved = run_dir / ".hydra" / "hydra.yaml"
    other = OmegaConf.select(OmegaConf.load(saved), "hydra.job.name") if saved.is_file() else None
    if other is not None and str(other) != job_name:
        raise WorldModelError(
            f"hydra.run.dir={run_dir} holds the output of a {other}.py run ({saved} says so), whose saved config this "
            f"{job_name}.py run would replace; nothing was changed. Choose a new directory (drop the hydra.run.dir "
            "override)."
        )


class FreshRunDir(Callback):
    """For scripts that write into a run directory of their own (evaluate.py, collect.py): refuses one that already
    holds files, before Hydra writes its .hydra/ there, which would replace another run's saved config and overrides
    (what resuming and summarize.py read). A -m sweep's directory must not hold files either. `check` names the
    script's own validation (e.g. worldmodel.config.validate_collect), run here too so that a refused value leaves no
    new directory behind."""

    def __init__(self, check: str | None = None):
        self.check = hydra.utils.get_method(check) if check else None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # as Hydra does for the task: the checks may resolve ${hydra:...}
        self._refuse_used(Path(OmegaConf.select(config, "hydra.run.dir")), "hydra.run.dir")
        if self.check is not None:
            with user_errors(callback=True):
                self.check(task_config(config))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._refuse_used(Path(OmegaConf.select(config, "hydra.sweep.dir")), "hydra.sweep.dir")

    @staticmethod
    def _refuse_used(run_dir: Path, key: str) -> None:
        held = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
        with user_errors(job=False, callback=True):
            _refuse_file(run_dir, key)
            if held:
                raise WorldModelError(
                    f"{key}={run_dir} already holds files ({', '.join(p.name for p in held[:3])}"
                    f"{', ...' if len(held) > 3 else ''}): this script writes its own .hydra/ and outputs there, over "
                    f"theirs. Nothing was changed. Choose a new directory (drop the {key} override)."
                )
