"""scripts/train.py as a user runs it: real subprocesses, real TensorBoard files, real checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, images, run_script, run_train, scalars, train_env
from worldmodel import RandomPolicy, ReplayBuffer, env_spec, make_env
from worldmodel.checkpoint import load_world_model
from worldmodel.cli import user_errors
from worldmodel.evaluation import open_loop
from worldmodel.runtime import VAL_SEED_OFFSET
from worldmodel.vector import make_collector

EXPECTED_TAGS = {
    "train/loss", "train/obs", "train/reward", "train/terminated",
    "val/loss", "val/obs", "val/reward", "val/terminated",
    "perf/env_steps_per_s", "perf/updates_per_s",
}  # fmt: skip


def first_last(series):
    return series[0][1], series[-1][1]


@pytest.mark.parametrize(
    "env_args",
    [["buffer.capacity=100000", "model.latent_dim=64"], ["env=pendulum"]],
    ids=["cartpole-discrete-users-command", "pendulum-continuous"],
)
def test_run_trains_and_logs_into_its_own_dir(tmp_path, env_args):
    run_dir = tmp_path / "run"
    proc = run_train([*env_args, *TINY, f"hydra.run.dir={run_dir}"])
    assert "val/loss" in proc.stdout

    events = list(run_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1, "TensorBoard events belong directly in the run's own directory"
    series = scalars(run_dir)
    assert EXPECTED_TAGS <= set(series)
    train_first, train_last = first_last(series["train/loss"])
    val_first, val_last = first_last(series["val/loss"])
    assert series["val/loss"][0][0] == 0 and series["val/loss"][-1][0] == 120
    assert train_last < train_first / 3 and val_last < val_first / 3
    # A true-vs-imagined figure at every validation pass, one 320-pixel panel per observation dimension.
    obs_dim = 3 if "env=pendulum" in env_args else 4
    steps = [step for step, _ in series["val/loss"]]
    assert images(run_dir)["eval/trajectory"] == [(step, 320 * obs_dim, 260) for step in steps]

    model, payload = load_world_model(run_dir / "checkpoints" / "last.pt")
    assert payload["config"]["trainer"]["steps"] == 120 and payload["metrics"]["val/loss"] == pytest.approx(val_last)
    assert bool(model.normalizer.fitted)
    if env_args[0].startswith("buffer"):
        assert payload["config"]["buffer"]["capacity"] == 100000 and model.latent_dim == 64
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()


def test_same_seed_gives_the_same_numbers(tmp_path):
    """One run in a fresh interpreter and one forked by tests/script_server.py: they differ in hash seed and in
    numpy's and `random`'s unseeded state, so a number drawn without the seed would differ, as would the numbers of a
    fork that does not run as a fresh process does."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir, fresh in zip(runs, (True, False)):
        run_train([*TINY, "trainer.steps=40", f"hydra.run.dir={run_dir}"], fresh=fresh)
    a, b = scalars(runs[0]), scalars(runs[1])
    for tag in ("train/loss", "val/loss", "val/obs"):
        assert a[tag] == b[tag]
    wa = torch.load(runs[0] / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(runs[1] / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "bad, key",
    [
        (["buffer.capacity=8", "trainer.seq_len=16"], "buffer.capacity"),
        (["env.id=NoSuchEnv-v3"], "env.id"),
        (["trainer.batch_size=0"], "trainer.batch_size"),
    ],
)
def test_bad_input_fails_before_work_with_a_clear_message(tmp_path, bad, key):
    run_dir = tmp_path / "run"
    proc = run_train([*bad, f"hydra.run.dir={run_dir}"], check=False)
    assert proc.returncode == 2
    assert f"`{key}=" in proc.stderr and "expected" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(run_dir.glob("events.out.tfevents.*")) and not (run_dir / "checkpoints").exists()


def held_out_copy_last_nmse(seed: int, model, steps: int = 200) -> list[float]:
    """eval/copy_last_nmse_h{1,5,15} of `steps` Pendulum transitions collected as scripts/train.py collects its
    held-out data from `seed` (env, random policy and collector all seeded with it), in float32."""
    env = make_env("Pendulum-v1", seed=seed)
    spec = env_spec(env)
    buffer = ReplayBuffer(steps, spec.obs_dim, spec.action_dim, seed=seed)
    make_collector(env, buffer, RandomPolicy(env.action_space, seed), seed=seed, spec=spec).collect(steps)
    result = open_loop(model, buffer, 5, 15)
    return [float(result.copy_last_nmse[h - 1]) for h in (1, 5, 15)]


def test_held_out_data_is_kept_in_full_precision_whatever_the_training_buffer_stores(tmp_path):
    """buffer.obs_dtype=bfloat16 once rounded the held-out targets too, so val/* and eval/* measured the rounding
    (3-4x worse on MountainCar) and a sweep over obs_dtype compared metrics on different scales. The copy-last
    baseline depends on the held-out data alone: the same for every storage dtype. It is that of episodes from the
    env seeded with seed + VAL_SEED_OFFSET, not of the training run's own episodes (seed): validation measures data
    the model never trained on."""
    runs = {dtype: tmp_path / dtype for dtype in ("float32", "bfloat16")}
    for dtype, run_dir in runs.items():
        run_train([*TINY, "env=pendulum", "trainer.steps=40", f"buffer.obs_dtype={dtype}", f"hydra.run.dir={run_dir}"])
    a, b = scalars(runs["float32"]), scalars(runs["bfloat16"])
    for h in (1, 5, 15):
        assert a[f"eval/copy_last_nmse_h{h}"] == b[f"eval/copy_last_nmse_h{h}"]
    model, _ = load_world_model(runs["float32"] / "checkpoints" / "last.pt")
    logged = [a[f"eval/copy_last_nmse_h{h}"][-1][1] for h in (1, 5, 15)]
    assert logged == pytest.approx(held_out_copy_last_nmse(VAL_SEED_OFFSET, model), rel=1e-5)
    assert logged != pytest.approx(held_out_copy_last_nmse(0, model), rel=1e-3)  # the training episodes' differ


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_train(["env.id=NoSuchEnv-v3", f"hydra.run.dir={tmp_path}"], check=False,
                     env_vars={"WORLDMODEL_DEBUG": "1", "HYDRA_FULL_ERROR": "1"})  # fmt: skip
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "env.id" in proc.stderr


@pytest.mark.parametrize(
    "bad, named",
    [
        (["env.id=FrozenLake-v1"], "env.id=FrozenLake-v1"),  # registered, but its observations are not a Box
        # A wrong shape or size is found when the file is loaded; a missing file before Hydra writes the run dir.
        (["buffer.dataset=no/such/file.npz"], "no/such/file.npz does not exist"),
        # 10**13 rows: hundreds of TB, more than any machine has; refused before torch tries to allocate it.
        (["buffer.capacity=10000000000000"], "capacity=10000000000000 (buffer.capacity"),
    ],
)
def test_mistakes_found_while_building_get_the_same_clear_message(tmp_path, bad, named):
    """Raised inside hydra.utils.instantiate (make_env, the dataset loader), which wraps them in its own error."""
    proc = run_train([*TINY, *bad, f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2 and named in proc.stderr
    assert "Traceback" not in proc.stderr and "Error in call to target" not in proc.stderr


def test_a_finished_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_train([*TINY, "trainer.steps=20", f"hydra.run.dir={run_dir}"])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_train([*TINY, "trainer.steps=20", "seed=5", f"hydra.run.dir={run_dir}"], check=False)
    assert proc.returncode == 2 and "already holds another run" in proc.stderr
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # checkpoint, events, .hydra/config.yaml and train.log all untouched
    # Output into a pipe whose reader has gone (`2>&1 | true`): the refusal cannot be printed, and must still stop
    # the run. Hydra makes an exception raised in its callback a warning and goes on to write the directory.
    read, write = os.pipe()
    os.close(read)
    try:
        gone = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *TINY, "trainer.steps=20", "seed=5",
                               f"hydra.run.dir={run_dir}"], cwd=REPO, env=train_env(), stdout=write, stderr=write,
                              timeout=600)  # fmt: skip
    finally:
        os.close(write)
    assert gone.returncode != 0
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_value_that_cannot_be_read_is_refused_and_a_finished_run_keeps_its_files(tmp_path):
    """A key removed with ~, left ???, or an interpolation that does not resolve raises OmegaConf's own errors in the
    pre-run checks. Hydra turns an exception there into a warning and goes on to write .hydra/, so these once
    replaced a finished run's saved config (and then failed with a traceback)."""
    run_dir = tmp_path / "run"
    run_train([*TINY, "trainer.steps=20", f"hydra.run.dir={run_dir}"])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for bad, said in [("trainer.steps=???", "no usable value at `trainer.steps`"),
                      ("trainer.steps=${oc.env:WM_NO_SUCH_VARIABLE}", "no usable value at `trainer.steps`"),
                      ("trainer.lr=???", "no usable value at `trainer.lr`"),
                      ("~trainer.steps", "`trainer.steps=(removed with ~trainer.steps)`: expected a value"),
                      # Read with a default (the constructor's, 2, not gru.yaml's 1), it once trained another model.
                      ("~model.head_layers", "`model.head_layers=(removed with ~model.head_layers)`")]:
        proc = run_train([*TINY, bad, f"hydra.run.dir={run_dir}", "trainer.resume=true"], check=False)
        assert proc.returncode == 2 and said in proc.stderr, (bad, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    for inside_a_file in (run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt" / "sub"):
        proc = run_train([*TINY, f"hydra.run.dir={inside_a_file}"], check=False)
        assert proc.returncode == 2 and "last.pt is a file, not a directory" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_any_error_in_a_pre_run_check_ends_the_script(capsys):
    """The safety net under the checks: whatever a check raises, the script stops before Hydra writes the run dir."""
    with pytest.raises(SystemExit) as stop, user_errors(callback=True):
        raise RuntimeError("a check's own bug")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "RuntimeError: a check's own bug" in err and "nothing was written" in err


def test_only_user_mistakes_become_one_line_errors_and_the_debug_flag_keeps_tracebacks(monkeypatch, capsys):
    """A constructor's own bug (a TypeError inside instantiate) is not the user's mistake: it keeps its traceback. With
    WORLDMODEL_DEBUG set, a mistake raised in the task keeps its traceback too."""
    from hydra.errors import InstantiationException

    from worldmodel.errors import WorldModelError

    monkeypatch.delenv("WORLDMODEL_DEBUG", raising=False)
    with pytest.raises(InstantiationException), user_errors():
        try:
            raise TypeError("a bug in the constructor")
        except TypeError as bug:
            raise InstantiationException("Error in call to target") from bug
    with pytest.raises(SystemExit) as stop, user_errors():
        raise WorldModelError("a mistake")
    assert stop.value.code == 2 and "error: a mistake" in capsys.readouterr().err
    monkeypatch.setenv("WORLDMODEL_DEBUG", "1")
    with pytest.raises(WorldModelError, match="a mistake"), user_errors():
        raise WorldModelError("a mistake")


class _ReaderGone:
    """stderr piped into a process that has exited."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    flush = write


def test_an_error_that_cannot_be_printed_still_exits(monkeypatch):
    """In a Hydra callback an exception is a warning, after which the refused run writes its directory: the print's
    BrokenPipeError must not replace the exit."""
    from worldmodel.errors import WorldModelError

    monkeypatch.delenv("WORLDMODEL_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stderr", _ReaderGone())
    for callback in (False, True):
        with pytest.raises(SystemExit) as stop, user_errors(callback=callback):
            raise WorldModelError("a mistake")
        assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop, user_errors(callback=True):
        raise RuntimeError("a bug in a check")  # its traceback cannot be printed either
    assert stop.value.code == 2
    monkeypatch.setenv("WORLDMODEL_DEBUG", "1")
    with pytest.raises(SystemExit) as stop, user_errors(callback=True):
        raise WorldModelError("a mistake")
    assert stop.value.code == 2


def test_the_resume_command_names_the_training_script_whatever_process_runs_it(tmp_path, monkeypatch, capsys):
    """In a submitit job sys.argv[0] is submitit's _submit.py: a job stopped by SIGTERM once printed a command that
    ran it, with the run's overrides, and failed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from conftest import CONF
    from worldmodel.errors import RunInterrupted

    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored after the test
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        HydraConfig.instance().set_config(compose("config", overrides=["seed=3"], return_hydra_config=True))
    monkeypatch.setattr("sys.argv", ["/venv/site-packages/submitit/core/_submit.py", "/tmp/submitit_folder"])
    checkpoint = tmp_path / "checkpoints" / "step_00000030.pt"
    with pytest.raises(SystemExit), user_errors(script="/repo/scripts/train.py"):
        raise RunInterrupted(15, 30, checkpoint)
    err = capsys.readouterr().err
    assert f"python /repo/scripts/train.py seed=3 hydra.run.dir={tmp_path} trainer.resume=true" in err, err


def test_a_run_stopped_before_its_first_checkpoint_is_never_written_into(tmp_path):
    """Its event file holds curves that a new run's would be mixed with; its .hydra/ the overrides it was run with."""
    run_dir = tmp_path / "run"
    run_train([*TINY, "trainer.steps=20", f"hydra.run.dir={run_dir}"])
    shutil.rmtree(run_dir / "checkpoints")  # what a run killed before trainer.checkpoint_every updates leaves
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_train([*TINY, "trainer.steps=20", "seed=5", f"hydra.run.dir={run_dir}"], check=False)
    assert proc.returncode == 2 and "TensorBoard logs" in proc.stderr and "no checkpoint" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # Both refusals name the one command that works there: auto starts that run over in its directory.
    assert "add trainer.resume=auto to start that run over" in proc.stderr
    proc = run_train([*TINY, "trainer.steps=20", f"hydra.run.dir={run_dir}", "trainer.resume=true"], check=False)
    assert proc.returncode == 2 and "give trainer.resume=auto, which starts it over" in proc.stderr
    run_train([*TINY, "trainer.steps=20", f"hydra.run.dir={run_dir}", "trainer.resume=auto"])


def test_a_finished_sweep_is_never_overwritten(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(["-m", "seed=0", *TINY, "trainer.steps=20", f"hydra.sweep.dir={sweep}"])
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    proc = run_train(["-m", "seed=0,1", *TINY, "trainer.steps=20", f"hydra.sweep.dir={sweep}"], check=False)
    assert proc.returncode == 2 and "already holds checkpoints of 1 earlier job(s)" in proc.stderr
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before


def test_multirun_gives_every_job_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(["-m", "seed=0,1", *TINY, "trainer.steps=40", f"hydra.sweep.dir={sweep}"])
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == [f"{n}_seed-{n}_trainer.prefill-400_trainer.val_steps-200" for n in (0, 1)]
    finals = []
    for job in jobs:
        assert (job / "checkpoints" / "last.pt").is_file()
        finals.append(scalars(job)["val/loss"][-1][1])
    assert finals[0] != finals[1]  # different seeds, different runs


@pytest.mark.slow
def test_default_run_finishes_and_validation_loss_falls_tenfold(tmp_path):
    run_dir = tmp_path / "default"
    run_train([f"hydra.run.dir={run_dir}"])
    val = scalars(run_dir)["val/loss"]
    assert val[0][0] == 0 and val[-1][0] == 10000
    assert val[-1][1] < val[0][1] / 10


def test_bf16_autocast_run_trains(tmp_path):
    """trainer.precision=bf16 (autocast; on CPU too, where it is slower but must still learn)."""
    run_dir = tmp_path / "run"
    run_train([*TINY, "trainer.precision=bf16", f"hydra.run.dir={run_dir}"])
    val_first, val_last = first_last(scalars(run_dir)["val/loss"])
    assert val_last < val_first / 3


@pytest.mark.slow  # about 45 s on 2 CPU cores, most of it compiling
def test_compiled_run_matches_eager_and_trains(tmp_path):
    """trainer.compile=true computes the same loss as eager mode (up to float reassociation) and learns."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_train([*TINY, f"hydra.run.dir={eager}"])
    run_train([*TINY, "trainer.compile=true", f"hydra.run.dir={compiled}"])
    e, c = scalars(eager), scalars(compiled)
    assert c["train/loss"][0][1] == pytest.approx(e["train/loss"][0][1], rel=1e-3)  # mean of the first 20 updates
    val_first, val_last = first_last(c["val/loss"])
    assert val_last < val_first / 3


def test_damaged_or_misnamed_checkpoints_get_errors_that_say_what_to_do(tmp_path):
    """An empty or cut newest checkpoint names the one before it to resume from; a folder given as a checkpoint names a
    file in it; evaluate.py finds a damaged file before Hydra writes its directory."""
    run_dir = tmp_path / "run"
    run_train([*TINY, "trainer.checkpoint_every=40", f"hydra.run.dir={run_dir}"])
    folder = run_dir / "checkpoints"
    newest = folder / "step_00000120.pt"
    os.unlink(folder / "last.pt")  # a hard link to the newest step file
    newest.write_bytes(newest.read_bytes()[:-100])  # cut, as a full disk would leave it
    proc = run_train([*TINY, "trainer.steps=200", f"hydra.run.dir={run_dir}", "trainer.resume=true"], check=False)
    assert proc.returncode == 2 and "step_00000120.pt is unreadable or truncated" in proc.stderr, proc.stderr
    assert f"previous checkpoint is {folder / 'step_00000080.pt'}" in proc.stderr
    for given, named in ((run_dir, "step_00000120.pt"), (folder, "step_00000120.pt")):
        out = tmp_path / f"eval_{given.name}"
        proc = run_script("evaluate.py", [f"checkpoint={given}", "data=no.npz", f"hydra.run.dir={out}"])
        assert proc.returncode == 2 and f"{given} is a directory" in proc.stderr and named in proc.stderr
    newest.write_bytes(b"")
    out = tmp_path / "eval_empty"
    proc = run_script("evaluate.py", [f"checkpoint={newest}", "data=no.npz", f"hydra.run.dir={out}"])
    assert proc.returncode == 2 and "unreadable or truncated (0 bytes" in proc.stderr and not out.exists()


def test_an_env_that_returns_nan_before_training_is_refused_and_nothing_is_trained(tmp_path):
    """Observations NaN from the 51st env step, inside the prefill: refused with the counts, exit 2, before the first
    evaluation (a NaN trajectory figure raised a matplotlib traceback here) and before any checkpoint or log."""
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "env.id=nan_env:NanCartPole-v0", "+env.kwargs.nan_after=50", f"hydra.run.dir={run_dir}"],
                     check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the prefill data holds NaN/inf values (obs: " in proc.stderr and "The env returned them" in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not list(run_dir.glob("events.out.tfevents.*"))


def test_an_env_option_whose_package_is_missing_is_a_one_paragraph_error(tmp_path):
    """render_mode=human needs pygame, which gymnasium asks for only at the first reset, after make_env."""
    try:
        import pygame  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pygame is installed: the env would open a window")
    proc = run_train([*TINY, "+env.kwargs.render_mode=human", f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "The env needs a package that is not installed" in proc.stderr and "pygame" in proc.stderr
