"""Shared helpers: composing the real Hydra config, and running scripts/train.py as a real subprocess."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
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
    """Starts `python scripts/train.py ARGS` in the background (for tests that signal or kill it): a fresh
    interpreter, with no part in its start-up borrowed from another process."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _environment_left_as_found():
    """Each test leaves os.environ as it found it. torch's in-process compile writes TORCHINDUCTOR_CACHE_DIR and
    _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR into it (set again before each use), and a variable left there made every
    later run_script of that pytest worker differ from the script server's environment, so it ran fresh: the tests
    that check a run is forked (test_script_server.py) failed when such a test had run before them in their worker."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


def run_script(name: str, args: list[str], cwd: Path | None = None, env_vars: dict | None = None,
               fresh: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
    """Runs `python scripts/NAME ARGS` (train.py, evaluate.py, ...) and returns the CompletedProcess (text output).

    A fork of tests/script_server.py, which has imported torch and the rest once, unless `fresh` (the same-seed test:
    fresh interpreters differ in hash seed and unseeded global state) or the run's environment differs from the one
    the server imported in (`env_vars`, a monkeypatched variable: read at import, it could change what a fork already
    imported), or on a machine with CUDA. Then a fresh `python`, as the command line starts it."""
    env = train_env(env_vars)
    command = [sys.executable, str(REPO / "scripts" / name), *args]
    # Not on a CUDA machine: an import there might initialize CUDA (cuInit) in the server, and a fork of a process
    # that has done so cannot use CUDA. Only the CUDA tests run there, and a fresh run costs a GPU machine little.
    server = None if fresh or torch.cuda.is_available() else _ScriptServer.get()
    if server is None or server.differs(env):
        return subprocess.run(command, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return server.run(command, cwd or REPO, env, timeout)


def run_train(args: list[str], cwd: Path | None = None, check: bool = True, env_vars: dict | None = None,
              fresh: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    """Runs `python scripts/train.py ARGS` (see `run_script`); a run that fails fails the test unless `check=False`."""
    proc = run_script("train.py", args, cwd, env_vars, fresh, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"train.py {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


class _ScriptServer:
    """This pytest process's tests/script_server.py, started at the first script run and ended with the process."""

    _running: _ScriptServer | None = None

    @classmethod
    def get(cls) -> _ScriptServer:
        if cls._running is None or cls._running.proc.poll() is not None:
            cls._running = cls()
        return cls._running

    def __init__(self):
        # The environment of the first run, not of this file's import: the test modules' own imports set variables
        # (gymnasium sets PYGAME_HIDE_SUPPORT_PROMPT) that every later run has too.
        self.env = train_env()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "script_server.py")], cwd=REPO,
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        atexit.register(self.proc.stdin.close)  # the server ends when its input does

    def differs(self, env: dict) -> bool:
        """Whether a run in `env` could import differently (pytest names the current test in one variable)."""
        def drop(e):
            return {k: v for k, v in e.items() if k != "PYTEST_CURRENT_TEST"}
        return drop(env) != drop(self.env)

    def run(self, command: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"script": command[1], "args": command[2:], "cwd": str(cwd), "env": env,
                       "stdout": str(out), "stderr": str(err)}  # fmt: skip
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._answer(timeout=60)["pid"]
            try:
                code = self._answer(timeout)["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._answer(timeout=60)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())

    def _answer(self, timeout: float) -> dict:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired("script_server", timeout)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tests/script_server.py ended (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)


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
