"""How scripts treat the user: mistakes are reported as one paragraph with exit code 2, and no run's files are
ever written over."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from worldmodel.checkpoint import last_checkpoint
from worldmodel.errors import WorldModelError

#: Set WORLDMODEL_DEBUG=1 to get the full traceback instead.
DEBUG_ENV = "WORLDMODEL_DEBUG"


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except WorldModelError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {err}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(2)  # SystemExit, not Exception: Hydra would turn an exception raised in a callback into a warning


class RefuseFinishedRuns(Callback):
    """Stops a run or sweep aimed at a directory that holds a finished run.

    Hydra saves .hydra/config.yaml into the output directory before the task starts, so the check must happen here,
    in on_run_start / on_multirun_start, which Hydra calls before it writes anything.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(OmegaConf.select(config, "hydra.run.dir"))
        with user_errors():
            if last_checkpoint(run_dir).exists():
                raise WorldModelError(
                    f"hydra.run.dir={run_dir} already holds a finished run ({last_checkpoint(run_dir)}). Choose a "
                    "new directory (drop the hydra.run.dir override, or point it elsewhere); nothing was changed."
                )

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        finished = sorted(sweep_dir.glob("**/checkpoints/last.pt")) if sweep_dir.is_dir() else []
        with user_errors():
            if finished:
                raise WorldModelError(
                    f"hydra.sweep.dir={sweep_dir} already holds {len(finished)} finished run(s), e.g. {finished[0]}. "
                    "Choose a new sweep directory (drop the hydra.sweep.dir override); nothing was changed."
                )
