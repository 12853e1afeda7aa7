"""Shared helpers: composing the real Hydra config, and running scripts/train.py as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (pyproject.toml: -n auto), and the scripts the tests run use one thread each (train_env):
    # a second torch thread in a worker would only contend for a core another process is using.
    torch.set_num_threads(1)

#: Overrides that make a real run take seconds: enough updates for the loss to fall, tiny prefill and validation.
TINY = [
    "trainer.steps=120",
    "trainer.prefill=400",
    "trainer.val_steps=200",
    "trainer.eval_every=40",
    "trainer.log_every=20",
    "trainer.progress=false",
]


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


def train_env(env_vars: dict | None = None) -> dict:
    # tests/ on the path so runs can use test envs such as nan_env:NanCartPole-v0. One torch thread: these runs are
    # tiny, and on a 2-core machine two threads per process oversubscribe the cores (2-6x slower, measured).
    # A PYTHONPATH already set (packages carried to a GPU machine, see benchmarks/gpu_check.sh) stays behind it.
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return {**os.environ, **env, **(env_vars or {})}


def start_train(args: list[str]) -> subprocess.Popen:
    """Starts `python scripts/train.py ARGS` in the background (for tests that signal or kill it)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_script(name: str, args: list[str]) -> subprocess.CompletedProcess:
    """Runs `python scripts/NAME ARGS` (evaluate.py, collect.py, ...) and returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def run_train(args: list[str], cwd: Path | None = None, check: bool = True, env_vars: dict | None = None):
    """Runs `python scripts/train.py ARGS` and returns the CompletedProcess (stdout/stderr as text)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        cwd=cwd or REPO,
        env=train_env(env_vars),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"train.py {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def images(run_dir: Path) -> dict[str, list[tuple[int, int, int]]]:
    """Every image series in the run dir's TensorBoard event files, as {tag: [(step, width, height), ...]}."""
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [(e.step, e.width, e.height) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run dir's TensorBoard event files, as {tag: [(step, value), ...]}."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar point in the run dir's event files as written, in file order: unlike `scalars`, no purge marker
    is applied, which is how TensorBoard's default (Rust) loader reads them."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    points: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    points.setdefault(value.tag, []).append((event.step, float(tensor_util.make_ndarray(value.tensor))))
    return points


def raw_tags(run_dir: Path) -> list[str]:
    """Every summary tag in the run dir's event files as written (one entry per event, in file order)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [v.tag for p in sorted(run_dir.glob("events.out.tfevents.*")) for e in EventFileLoader(str(p)).Load()
            for v in e.summary.value]  # fmt: skip


def hparams_experiment(logdir: Path):
    """What TensorBoard's HParams tab shows for `logdir` (a sweep or a run): its own backend's GetExperiment answer,
    an api_pb2.Experiment with hparam_infos and metric_infos."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux, data_provider=provider)
    backend = backend_context.Context(tb)
    return get_experiment.Handler(context.RequestContext(), backend, "", api_pb2.GetExperimentRequest()).run()
