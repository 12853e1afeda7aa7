"""Runs that survive: checkpoints, exact resume after SIGTERM/SIGINT/SIGKILL, refusals that change nothing."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

from conftest import REPO, compose_config, raw_scalars, raw_tags, run_train, scalars, start_train, train_env
from worldmodel import ReplayBuffer, env_spec, make_env
from worldmodel import checkpoint as checkpoint_module
from worldmodel.checkpoint import Checkpointer, atomic_torch_save, finish_checkpoints, read_checkpoint, step_checkpoints
from worldmodel.env import EnvSpec
from worldmodel.errors import WorldModelError
from worldmodel.logger import Logger, has_hparams, prune_events
from worldmodel.models import EnsembleWorldModel, RSSMWorldModel
from worldmodel.replay import TABLES_VERSION
from worldmodel.resume import RESUMABLE_CHANGES, config_differences, load_for_resume, resume_payload
from worldmodel.rollout import RandomPolicy
from worldmodel.runtime import seed_everything
from worldmodel.trainer import Trainer
from worldmodel.vector import make_collector

# Small but real: enough updates to cross several checkpoints, logs and evaluations.
RUN = [
    "trainer.steps=240",
    "trainer.prefill=300",
    "trainer.val_steps=200",
    "trainer.checkpoint_every=60",
    "trainer.log_every=20",
    "trainer.eval_every=40",
    "trainer.progress=false",
]


def files(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def wait_for(path: Path, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared:\n{proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def assert_same_run(a: Path, b: Path) -> None:
    """Logged losses and final weights equal to the bit. The event files themselves hold the same points, with no
    stale ones from a killed attempt (TensorBoard's default loader ignores purge markers)."""
    sa, sb = scalars(a), scalars(b)
    for tag in sa:
        if tag.startswith(("train/", "val/", "data/")):
            assert sa[tag] == sb[tag], tag
    ra, rb = raw_scalars(a), raw_scalars(b)
    for tag in ra:
        if tag.startswith(("train/", "val/", "data/")):
            assert sorted(ra[tag]) == sorted(rb[tag]), tag
    assert_same_weights(torch.load(a / "checkpoints" / "last.pt", weights_only=True),
                        torch.load(b / "checkpoints" / "last.pt", weights_only=True))  # fmt: skip


def assert_same_weights(wa: dict, wb: dict) -> None:
    """Two checkpoints' model and optimizer state equal to the bit."""
    for part in ("model", "optimizer"):
        flat_a, flat_b = wa[part], wb[part]
        if part == "optimizer":
            flat_a = {f"{i}.{k}": v for i, s in flat_a["state"].items() for k, v in s.items()}
            flat_b = {f"{i}.{k}": v for i, s in flat_b["state"].items() for k, v in s.items()}
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_train([*RUN, f"hydra.run.dir={run_dir}"])
    return run_dir


def printed_resume_args(err: str) -> list[str]:
    """The arguments of the command a stopped run printed after "Resume with:", without "python <script>"."""
    return shlex.split(err.split("Resume with:")[1].strip().splitlines()[0])[2:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_exits_and_resumes_bit_identical(tmp_path, uninterrupted, sig):
    run_dir = tmp_path / "run"
    proc = start_train([*RUN, f"hydra.run.dir={run_dir}"])
    wait_for(run_dir / "checkpoints" / "step_00000060.pt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    assert "Resume with:" in err and "trainer.resume=true" in err and f"hydra.run.dir={run_dir}" in err
    assert "Traceback" not in err
    stopped_at = step_checkpoints(run_dir)[-1][0]
    assert 60 <= stopped_at < 240 and not (run_dir / "checkpoints" / "last.pt").exists()

    resume_cmd = printed_resume_args(err)
    run_train(resume_cmd)
    assert_same_run(uninterrupted, run_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_prefill_stops_cleanly_and_the_directory_takes_the_rerun(tmp_path, sig):
    """Before the first update there is nothing to checkpoint: the run says so (no traceback for Ctrl-C, not a silent
    death for SIGTERM) and leaves no TensorBoard log, so the same command, same directory, starts over."""
    run_dir = tmp_path / "run"
    proc = start_train([*RUN, "trainer.prefill=3000000", f"hydra.run.dir={run_dir}"])  # about half a minute here
    deadline = time.monotonic() + 120
    while "prefill:" not in ((run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "during the prefill" in err and "nothing to resume" in err and "Traceback" not in err
    assert not list(run_dir.glob("events.out.tfevents.*")) and not step_checkpoints(run_dir)
    run_train([*RUN, "trainer.steps=20", f"hydra.run.dir={run_dir}"])
    assert step_checkpoints(run_dir)[-1][0] == 20


def test_sigkill_right_after_a_checkpoint_resumes_bit_identical(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start_train([*RUN, f"hydra.run.dir={run_dir}"])
    wait_for(run_dir / "checkpoints" / "step_00000120.pt", proc)
    proc.kill()
    proc.communicate()
    assert step_checkpoints(run_dir)[-1][0] == 120
    run_train([*RUN, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    # Whatever the killed process logged after update 120 is purged: the curves match the uninterrupted run's.
    assert_same_run(uninterrupted, run_dir)


def test_resume_a_finished_run_for_more_updates(tmp_path):
    run_dir = tmp_path / "run"
    run_train([*RUN, "trainer.steps=60", f"hydra.run.dir={run_dir}"])
    run_train([*RUN, "trainer.steps=120", f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    val_steps = [s for s, _ in scalars(run_dir)["val/loss"]]
    assert val_steps == [0, 40, 60, 80, 120]  # continued, no duplicated step
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 120
    # The config text and the HParams summary are the continued run's (trainer.steps=120), not the first finish's:
    # TensorBoard shows the first it reads of each.
    tags = raw_tags(run_dir)
    assert tags.count("config/text_summary") == tags.count("_hparams_/session_start_info") == 1
    assert [s for s, _ in raw_scalars(run_dir)["hparams/val/loss"]] == [120]
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    assert "steps: 120" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    start = hp_metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)[hp_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["trainer.steps"].number_value == 120


def test_points_a_killed_run_logged_after_its_checkpoint_are_removed_from_the_files(tmp_path, uninterrupted):
    """What a run killed after its checkpoint at 120 leaves, made exactly: the uninterrupted run with the later
    checkpoints deleted, so its event file holds points up to 240 that the resumed run logs again."""
    run_dir = tmp_path / "run"
    run_train([*RUN, f"hydra.run.dir={run_dir}"])
    for step, path in step_checkpoints(run_dir):
        if step > 120:
            path.unlink()
    (run_dir / "checkpoints" / "last.pt").unlink()
    run_train([*RUN, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    assert_same_run(uninterrupted, run_dir)
    assert all(len({step for step, _ in points}) == len(points) for points in raw_scalars(run_dir).values())


def test_a_run_killed_after_its_final_checkpoint_is_finished_by_auto(tmp_path):
    """A SIGKILL between the final step file and the end of the run leaves no last.pt, one step file too many and no
    HParams summary; auto then found 'nothing to do' for ever, and evaluate.py and summarize.py saw no finished run."""
    run_dir = tmp_path / "run"
    args = [*RUN, "trainer.steps=120", "trainer.keep_checkpoints=1", f"hydra.run.dir={run_dir}"]
    run_train(args)
    finished = raw_scalars(run_dir)["hparams/val/loss"]
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "last.pt").unlink()
    (checkpoints / "step_00000060.pt").write_bytes((checkpoints / "step_00000120.pt").read_bytes())  # not yet pruned
    prune_events(run_dir, before_step=10**9)  # drops the config text and the HParams summary, as if never written
    assert not has_hparams(run_dir)

    proc = run_train([*args, "trainer.resume=auto"])
    assert "nothing to do" in proc.stdout
    assert [p.name for _, p in step_checkpoints(run_dir)] == ["step_00000120.pt"]
    assert (checkpoints / "last.pt").samefile(checkpoints / "step_00000120.pt")
    assert raw_scalars(run_dir)["hparams/val/loss"] == finished
    assert raw_tags(run_dir).count("config/text_summary") == 1
    before = files(run_dir)
    run_train([*args, "trainer.resume=auto"])
    assert files(run_dir) == before  # finished now: a second auto changes nothing


def test_finishing_on_a_file_system_without_hard_links_copies_once(tmp_path, monkeypatch):
    """last.pt is then a copy: finishing again (every trainer.resume=auto of a finished job) must not rewrite it, and
    its temporary file must be one that the next run's clean-up finds."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step in (20, 40):
        (checkpoints / f"step_{step:08d}.pt").write_bytes(bytes([step]) * 1000)
    final = checkpoints / "step_00000040.pt"

    def no_links(*args):
        raise OSError("no hard links here")

    monkeypatch.setattr(checkpoint_module.os, "link", no_links)
    finish_checkpoints(tmp_path, final, keep=1)
    last = checkpoints / "last.pt"
    assert last.read_bytes() == final.read_bytes() and not last.samefile(final)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step_00000040.pt"]
    made = last.stat().st_ino, last.stat().st_mtime_ns
    finish_checkpoints(tmp_path, final, keep=1)
    assert (last.stat().st_ino, last.stat().st_mtime_ns) == made


def test_a_checkpoint_left_half_written_by_a_kill_is_removed(tmp_path):
    """Saved off the checkpoint_every schedule (on SIGTERM), its temporary name is never written again."""
    run_dir = tmp_path / "run"
    run_train([*RUN, "trainer.steps=60", f"hydra.run.dir={run_dir}"])
    stale = run_dir / "checkpoints" / ".step_00000061.pt.tmp"
    stale.write_bytes(b"\0" * 1000)
    run_train([*RUN, "trainer.steps=120", f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    assert not stale.exists()


def test_a_checkpointer_removes_a_half_written_checkpoint_as_the_run_starts(tmp_path):
    """The temporary file a kill left mid-save is a whole checkpoint's size: it goes as soon as the resumed run sets
    up its Checkpointer, not only when that run finishes (a run killed again before then would pile them up). The
    checkpoints themselves stay."""
    cfg = OmegaConf.create({"trainer": {"steps": 120}})
    spec = EnvSpec("X-v0", 2, 1, False)
    kept = Checkpointer(tmp_path, cfg, spec).save({"model": {"w": torch.ones(2)}}, step=60)
    stale = tmp_path / "checkpoints" / ".step_00000061.pt.tmp"
    stale.write_bytes(b"\0" * 1000)
    Checkpointer(tmp_path, cfg, spec)
    assert not stale.exists() and kept.is_file()


@pytest.mark.parametrize("resume", ["true", "auto"])
def test_a_finished_run_whose_step_files_were_deleted_resumes_from_last_pt(tmp_path, resume):
    run_dir = tmp_path / "run"
    run_train([*RUN, "trainer.steps=60", f"hydra.run.dir={run_dir}"])
    for _, path in step_checkpoints(run_dir):
        path.unlink()  # last.pt, a hard link to the final step file, still holds the run's state
    run_train([*RUN, "trainer.steps=120", f"hydra.run.dir={run_dir}", f"trainer.resume={resume}"])
    assert [s for s, _ in scalars(run_dir)["val/loss"]] == [0, 40, 60, 80, 120]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 120


@pytest.mark.parametrize(
    "change, named",
    [(["model.latent_dim=64"], "model.latent_dim"), (["env=pendulum"], "env.id"), (["seed=3"], "seed")],
)
def test_resume_with_a_different_experiment_is_refused_and_changes_nothing(tmp_path, change, named):
    run_dir = tmp_path / "run"
    run_train([*RUN, "trainer.steps=60", f"hydra.run.dir={run_dir}"])
    before = files(run_dir)
    proc = run_train([*RUN, *change, f"hydra.run.dir={run_dir}", "trainer.resume=true"], check=False)
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr
    assert files(run_dir) == before


def test_a_run_saved_before_a_key_existed_resumes_with_the_keys_default(tmp_path):
    """model.head_layers came after runs had been saved without it. Such a run was built with the constructor's
    default (2), so resuming with that value continues it; the config's new default (1) is refused, and the error
    names the value that resumes."""
    run_dir = tmp_path / "run"
    run_train([*RUN, "trainer.steps=60", "model.head_layers=2", f"hydra.run.dir={run_dir}"])
    for _, path in step_checkpoints(run_dir):  # make it a run saved before the key existed
        payload = torch.load(path, weights_only=False)
        del payload["config"]["model"]["head_layers"]
        atomic_torch_save(payload, path)
    before = files(run_dir)
    proc = run_train([*RUN, "trainer.steps=120", f"hydra.run.dir={run_dir}", "trainer.resume=true"], check=False)
    assert proc.returncode == 2 and "model.head_layers: saved '<absent: default 2>', now 1" in proc.stderr
    assert "and give model.head_layers=2: the saved run predates that key" in proc.stderr
    assert files(run_dir) == before
    run_train([*RUN, "trainer.steps=120", "model.head_layers=2", f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 120


@pytest.mark.parametrize(
    "steps, message",
    [("-5", "trainer.steps"), ("40", "trainer.steps=40 is below the 60 updates"),  # a bad value; fewer than done
     ("60", "trainer.steps=60 equals the 60 updates")],  # none left: the final validation and save would not run
)
def test_bad_steps_on_resume_are_refused_before_hydra_writes(tmp_path, steps, message):
    run_dir = tmp_path / "run"
    run_train([*RUN, "trainer.steps=60", f"hydra.run.dir={run_dir}"])
    before = files(run_dir)
    proc = run_train([*RUN, f"trainer.steps={steps}", f"hydra.run.dir={run_dir}", "trainer.resume=true"], check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert files(run_dir) == before  # .hydra/ and the event file included


def test_resume_errors_name_the_file(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*RUN, f"hydra.run.dir={run_dir}", "trainer.resume=true"], check=False)
    assert proc.returncode == 2 and "holds no step_*.pt or last.pt checkpoint" in proc.stderr
    assert not run_dir.exists()

    run_train([*RUN, "trainer.steps=60", f"hydra.run.dir={run_dir}"])
    newest = step_checkpoints(run_dir)[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])
    proc = run_train([*RUN, f"hydra.run.dir={run_dir}", "trainer.resume=true"], check=False)
    assert proc.returncode == 2 and str(newest) in proc.stderr and "truncated" in proc.stderr


def test_weights_that_overflow_are_never_checkpointed(tmp_path):
    """lr 1e39: the first update's losses are finite (computed before it), its weights are not (|w| ~ 1e39 overflows
    float32). No checkpoint may hold them, and none is named as good."""
    proc = run_train([*RUN, "trainer.lr=1e39", "trainer.checkpoint_every=1", f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2 and "the model's weights became non-finite at update 1" in proc.stderr
    assert "no checkpoint had been written yet" in proc.stderr and step_checkpoints(tmp_path) == []


@pytest.mark.parametrize("eval_every", [40, 30], ids=["evaluations-at-logs", "evaluations-between-logs"])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, eval_every):
    """The error names the first update whose training loss was non-finite, also when an evaluation between two
    logs (eval_every=30, log_every=20) meets the diverged weights first."""
    run_dir = tmp_path / "run"
    # Observations turn NaN from the 501st env step: prefill 300 + one step per update -> update 201 adds the first.
    args = ["env.id=nan_env:NanCartPole-v0", "+env.kwargs.nan_after=500", "trainer.checkpoint_every=50",
            f"trainer.eval_every={eval_every}"]  # fmt: skip
    proc = run_train([*RUN, *args, "trainer.steps=400", f"hydra.run.dir={run_dir}"], check=False)
    assert proc.returncode == 2
    diverged_at = int(re.search(r"non-finite at update (\d+)", proc.stderr).group(1))
    assert 200 < diverged_at < 250 and "train/obs" in proc.stderr
    found = step_checkpoints(run_dir)
    assert found[-1][0] == 200 and str(found[-1][1]) in proc.stderr
    weights = torch.load(found[-1][1], weights_only=True)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    run_dir = tmp_path / "run"
    run_train([*RUN, "trainer.checkpoint_every=20", "trainer.keep_checkpoints=2", f"hydra.run.dir={run_dir}"])
    assert [s for s, _ in step_checkpoints(run_dir)] == [220, 240]
    last, newest = run_dir / "checkpoints" / "last.pt", step_checkpoints(run_dir)[-1][1]
    assert last.read_bytes() == newest.read_bytes()


def test_a_crash_during_save_leaves_the_previous_checkpoint_readable(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from worldmodel.env import EnvSpec

    cfg = OmegaConf.create({"trainer": {"steps": 30}, "model": {"latent_dim": 8}})
    ckpt = Checkpointer(tmp_path, cfg, EnvSpec("X-v0", 2, 1, False), keep=3)
    ckpt.save({"model": {"w": torch.ones(3)}}, step=10)

    def dies_halfway(obj, f):
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"model": {"w": torch.zeros(3)}}, step=20)
    monkeypatch.undo()
    assert [s for s, _ in step_checkpoints(tmp_path)] == [10]
    assert torch.equal(load_for_resume(tmp_path, cfg)["model"]["w"], torch.ones(3))
    assert torch.equal(load_for_resume(tmp_path, cfg, mmap=True)["model"]["w"], torch.ones(3))  # the pre-run check


@pytest.mark.parametrize("earlier", [True, False])
def test_a_checkpoint_that_cannot_be_written_is_said_so_and_leaves_no_partial_file(tmp_path, monkeypatch, earlier):
    """On a full disk torch.save raises a RuntimeError about stream positions. The run says which file failed, the
    room left there and which checkpoint it can continue from, and removes the half-written file, which would
    otherwise keep the disk full."""
    from worldmodel.checkpoint import CheckpointWriteFailed
    from worldmodel.env import EnvSpec

    cfg = OmegaConf.create({"trainer": {"steps": 30}})
    ckpt = Checkpointer(tmp_path, cfg, EnvSpec("X-v0", 2, 1, False), keep=3)
    if earlier:
        ckpt.save({"model": {"w": torch.ones(3)}}, step=10)

    def disk_full(obj, f):
        f.write(b"\x80\x02partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteFailed) as err:
        ckpt.save({"model": {"w": torch.zeros(3)}}, step=20)
    monkeypatch.undo()
    message = str(err.value)
    assert "step_00000020.pt" in message and "unexpected pos" in message and "GiB are free there" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == (["step_00000010.pt"] if earlier else [])
    if earlier:
        assert f"checkpoint {tmp_path / 'checkpoints' / 'step_00000010.pt'} is whole" in message
        assert torch.equal(load_for_resume(tmp_path, cfg)["model"]["w"], torch.ones(3))
    else:
        assert "before any checkpoint" in message


def run_on_a_full_disk(args: list[str], saves: int) -> subprocess.CompletedProcess:
    """scripts/train.py ARGS where the disk fills up after `saves` checkpoints (tests/full_disk.py)."""
    code = "import full_disk, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    command = [sys.executable, "-c", code, str(REPO / "scripts" / "train.py"), *args]
    env = train_env({"FULL_DISK_AFTER": str(saves)})
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("saves, sweep", [(1, False), (0, False), (1, True)], ids=["saved", "nothing-saved", "sweep"])
def test_a_run_that_cannot_save_says_what_continues_it_and_that_command_does(tmp_path, saves, sweep):
    """A full disk mid-run: the error names what continues the run once there is room. A run with a checkpoint
    resumes from it; one with none starts over in its directory (trainer.resume=auto: the failed attempt left its
    TensorBoard log there, which a plain rerun would refuse); a sweep's job is continued by the sweep's own command
    (a single run's command aimed at the job's directory would be refused as another sweep's). Each command, run as
    printed, finishes the run."""
    where = tmp_path / "sweep" if sweep else tmp_path / "run"
    args = [*(["-m", "seed=0", f"hydra.sweep.dir={where}"] if sweep else [f"hydra.run.dir={where}"]), *RUN,
            "trainer.steps=120"]  # fmt: skip
    proc = run_on_a_full_disk(args, saves)
    assert proc.returncode == (1 if sweep else 2) and "Could not write checkpoint" in proc.stderr, proc.stderr
    run_dir = next(where.glob("0_*")) if sweep else where
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the half-written file is gone
    what = "continue the sweep" if sweep else "start it over" if saves == 0 else "continue from step_00000060.pt"
    command = proc.stderr.split(f"Make room, then {what} with:\n  ")[1].splitlines()[0]
    assert f"trainer.resume={'auto' if sweep or not saves else 'true'}" in command
    rerun = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO, env=train_env(), capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 120


def test_atomic_save_replaces_whole_files(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"a": torch.arange(3)}, path)
    atomic_torch_save({"a": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_config_differences_and_what_may_change():
    saved = {"env": {"id": "CartPole-v1"}, "trainer": {"steps": 10, "lr": 0.1}}
    now = {"env": {"id": "Pendulum-v1"}, "trainer": {"steps": 20, "lr": 0.1}, "new": 1}
    assert config_differences(saved, now) == {
        "env.id": ("CartPole-v1", "Pendulum-v1"),
        "trainer.steps": (10, 20),
        "new": ("<absent>", 1),
    }
    # A key the saved node lacks counts as its _target_'s default for it (the value the saved run was built with).
    gru = {"_target_": "worldmodel.models.GRUWorldModel", "latent_dim": 32}
    assert config_differences({"model": gru}, {"model": {**gru, "head_layers": 2}}) == {}
    assert config_differences({"model": gru}, {"model": {**gru, "head_layers": 1}}) == {
        "model.head_layers": ("<absent: default 2>", 1)
    }
    assert config_differences({"model": gru}, {"model": {**gru, "no_such_argument": 1}}) == {
        "model.no_such_argument": ("<absent>", 1)
    }
    with pytest.raises(WorldModelError, match="holds no step"):
        load_for_resume(Path("/nonexistent"), None)


#: What README "Stopping and resuming" says may change on resume, each with a value other than the default config's
#: (trainer.resume itself changes on every resume: false when saved, true now).
DOCUMENTED_CHANGES = {
    "trainer.steps": 20000, "trainer.eval_every": 7, "trainer.log_every": 3, "trainer.checkpoint_every": 11,
    "trainer.keep_checkpoints": 9, "trainer.device": "cpu", "trainer.progress": False, "trainer.compile": True,
    "trainer.compile_mode": "max-autotune", "trainer.cuda_graph": True, "buffer.device": "cpu",
    "trainer.resume": True,
}  # fmt: skip


def test_what_may_change_on_resume_is_exactly_what_readme_lists():
    """RESUMABLE_CHANGES is the code's list; a key added to it without README (trainer.batch_size, say) would let a
    resume silently continue another experiment, and one README lists but the code refuses would break a documented
    resume. Both lists must be the same set: README's sentence "Changing `trainer.steps`, `eval_every`, ... on resume is
    allowed" (bare names are trainer.*), plus trainer.resume, which every resume changes."""
    assert RESUMABLE_CHANGES == DOCUMENTED_CHANGES.keys()
    readme = (REPO / "README.md").read_text()
    sentence = re.search(r"Changing (.*?) on resume is allowed", readme, re.S)
    assert sentence, "README no longer says which keys may change on resume"
    listed = {name if "." in name else f"trainer.{name}" for name in re.findall(r"`([\w.]+)`", sentence.group(1))}
    assert listed | {"trainer.resume"} == DOCUMENTED_CHANGES.keys()


@pytest.mark.parametrize("key", DOCUMENTED_CHANGES)
def test_every_documented_change_resumes_and_another_is_refused(tmp_path, key):
    """A user may change what README lists on resume (more steps, another device...) and the run continues; a key
    outside that list (trainer.lr) is refused, naming it, even next to an allowed change."""
    saved = compose_config(["trainer.steps=100"])
    Checkpointer(tmp_path, saved, EnvSpec("X-v0", 2, 1, False)).save({"model": {}}, step=10)
    now = OmegaConf.merge(saved, OmegaConf.from_dotlist([f"{key}={DOCUMENTED_CHANGES[key]}"]))
    assert config_differences(OmegaConf.to_container(saved), OmegaConf.to_container(now)).keys() == {key}
    assert load_for_resume(tmp_path, now)["step"] == 10
    now.trainer.lr = 0.5
    with pytest.raises(WorldModelError, match=r"trainer\.lr: saved 0\.001, now 0\.5") as err:
        load_for_resume(tmp_path, now)
    assert key not in str(err.value).split("(")[1].split(")")[0]  # the allowed change is not among the refused


def test_resume_reads_the_newest_of_several_step_checkpoints(tmp_path):
    """With several step_*.pt kept, a resumed run continues from the newest, not from an older one."""
    cfg = OmegaConf.create({"trainer": {"steps": 100}})
    ckpt = Checkpointer(tmp_path, cfg, EnvSpec("X-v0", 2, 1, False), keep=3)
    for step in (10, 20, 30):
        ckpt.save({"model": {"w": torch.full((2,), float(step))}}, step=step)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [10, 20, 30]
    for mmap in (False, True):
        payload = load_for_resume(tmp_path, cfg, mmap=mmap)
        assert payload["step"] == 30 and payload["path"] == str(tmp_path / "checkpoints" / "step_00000030.pt")
        assert torch.equal(payload["model"]["w"], torch.full((2,), 30.0))


def test_an_unreadable_newest_checkpoint_names_the_previous_one_or_stands_alone(tmp_path):
    """A truncated newest step file is reported as such, naming the checkpoint just before it (the one to fall back
    to), not the oldest kept; where it is the only one there is no other to name, and still a one-paragraph error."""
    from worldmodel.checkpoint import CheckpointUnreadable

    cfg = OmegaConf.create({"trainer": {"steps": 100}})
    for steps in ([10], [10, 20, 30]):
        run_dir = tmp_path / str(len(steps))
        ckpt = Checkpointer(run_dir, cfg, EnvSpec("X-v0", 2, 1, False), keep=3)
        for step in steps:
            newest = ckpt.save({"model": {}}, step=step)
        newest.write_bytes(newest.read_bytes()[:1000])
        with pytest.raises(CheckpointUnreadable) as err:
            load_for_resume(run_dir, cfg)
        assert str(newest) in str(err.value) and "truncated" in str(err.value)
        if len(steps) > 1:
            assert "previous checkpoint is " + str(run_dir / "checkpoints" / "step_00000020.pt") in str(err.value)


def test_the_value_that_resumes_a_run_saved_before_a_key_existed_is_written_as_the_command_line_takes_it():
    """The error's "give model.x=..." must be an override Hydra reads back as the default: true/false and null, not
    Python's True/False/None."""
    from worldmodel.resume import AbsentDefault

    assert AbsentDefault(True).override("model.flag") == "model.flag=true"
    assert AbsentDefault(False).override("model.flag") == "model.flag=false"
    assert AbsentDefault(None).override("model.x") == "model.x=null"
    assert AbsentDefault(2).override("model.head_layers") == "model.head_layers=2"


def test_periodic_checkpoints_keep_exactly_the_newest_keep_checkpoints(tmp_path):
    """Pruned at each save, not only at the end: a run killed midway holds trainer.keep_checkpoints files, each with
    the replay buffer's stored rows."""
    cfg = OmegaConf.create({"trainer": {"steps": 100}})
    ckpt = Checkpointer(tmp_path, cfg, EnvSpec("X-v0", 2, 1, False), keep=2)
    for step in (10, 20, 30, 40):
        ckpt.save({"model": {}}, step=step)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [30, 40]


def test_a_run_directory_given_as_a_checkpoint_names_its_last_pt(tmp_path):
    """evaluate.py checkpoint=<run dir>: the hint is the finished run's last.pt (what README says to evaluate), not
    one of the step files beside it."""
    from worldmodel.checkpoint import require_checkpoint

    cfg = OmegaConf.create({"trainer": {"steps": 20}})
    ckpt = Checkpointer(tmp_path, cfg, EnvSpec("X-v0", 2, 1, False), keep=3)
    ckpt.save({"model": {}}, step=10)
    ckpt.save({"model": {}}, step=20, final=True)
    for given in (tmp_path, tmp_path / "checkpoints"):
        with pytest.raises(WorldModelError, match=f"is a directory; give a checkpoint file, such as "
                                                  f"{re.escape(str(tmp_path / 'checkpoints' / 'last.pt'))}"):
            require_checkpoint(given)


def test_a_failed_write_names_the_newest_whole_checkpoint(tmp_path, monkeypatch):
    """The checkpoint to continue from is the newest kept, not the oldest."""
    from worldmodel.checkpoint import CheckpointWriteFailed

    cfg = OmegaConf.create({"trainer": {"steps": 100}})
    ckpt = Checkpointer(tmp_path, cfg, EnvSpec("X-v0", 2, 1, False), keep=3)
    for step in (10, 20):
        ckpt.save({"model": {}}, step=step)

    def disk_full(obj, f):
        raise RuntimeError("unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteFailed) as err:
        ckpt.save({"model": {}}, step=30)
    assert f"checkpoint {tmp_path / 'checkpoints' / 'step_00000020.pt'} is whole" in str(err.value)


def test_a_finished_run_continued_past_its_last_pt_resumes_from_the_newer_step_file(tmp_path):
    """A run finished at step 10 (last.pt, a link to step 10), resumed for more updates and killed after its periodic
    checkpoint at step 20: the next resume continues from step 20. last.pt stands in only where no step file is
    left; preferring it would redo 10 updates and log them a second time."""
    cfg = OmegaConf.create({"trainer": {"steps": 100, "resume": True}})
    ckpt = Checkpointer(tmp_path, cfg, EnvSpec("X-v0", 2, 1, False), keep=3)
    ckpt.save({"model": {"w": torch.full((2,), 10.0)}}, step=10, final=True)
    ckpt.save({"model": {"w": torch.full((2,), 20.0)}}, step=20)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    for resume in (True, "auto"):
        cfg.trainer.resume = resume
        payload = resume_payload(tmp_path, cfg)
        assert payload["step"] == 20 and payload["path"] == str(tmp_path / "checkpoints" / "step_00000020.pt")
        assert torch.equal(payload["model"]["w"], torch.full((2,), 20.0))


def test_a_checkpoint_of_another_format_version_is_refused_naming_the_file(tmp_path):
    """A checkpoint written by another version of worldmodel is refused with a clear error naming it, never loaded
    as if its layout were this version's."""
    cfg = OmegaConf.create({"trainer": {"steps": 100}})
    path = Checkpointer(tmp_path, cfg, EnvSpec("X-v0", 2, 1, False)).save({"model": {}}, step=10)
    payload = torch.load(path, weights_only=True)
    for version in (2, None):
        if version is None:
            del payload["format_version"]
        else:
            payload["format_version"] = version
        atomic_torch_save(payload, path)
        for read in (lambda: read_checkpoint(path), lambda: load_for_resume(tmp_path, cfg)):
            with pytest.raises(WorldModelError, match=f"{re.escape(str(path))} was not written by this version"):
                read()


@pytest.fixture
def one_thread():
    """Tiny in-process runs, as the subprocess ones (conftest.train_env): two threads on two shared cores are slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run(run_dir: Path, model_name: str, steps: int, resume: bool | dict = False) -> dict:
    """In process, what scripts/train.py does: seed, build CartPole, buffers, a tiny `model_name` and Trainer, fit
    (from the newest checkpoint of `run_dir` with resume, or from the payload `resume`); returns the final
    checkpoint's payload."""
    seed_everything(0)
    cfg = OmegaConf.create({"trainer": {"steps": steps}})
    resume_from = load_for_resume(run_dir, cfg, mmap=True) if resume is True else resume or None
    env = make_env("CartPole-v1", seed=0)
    spec = env_spec(env)
    buffer = ReplayBuffer(1000, spec.obs_dim, spec.action_dim, seed=0)
    collector = make_collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec)
    val_env = make_env("CartPole-v1", seed=1)
    val_buffer = ReplayBuffer(60, spec.obs_dim, spec.action_dim, seed=1)
    val_collector = make_collector(val_env, val_buffer, RandomPolicy(val_env.action_space, 1), seed=1, spec=spec)
    if model_name == "rssm":
        model = RSSMWorldModel(spec.obs_dim, spec.action_dim, latent_dim=8, stoch_dim=4, hidden_dim=16, free_nats=0.0)
    else:
        model = EnsembleWorldModel(spec.obs_dim, spec.action_dim, latent_dim=8, hidden_dim=8, ensemble_size=3,
                                   num_layers=2)  # fmt: skip
    trainer = Trainer(steps=steps, prefill=100, batch_size=4, seq_len=6, lr=1e-2, val_steps=60, eval_every=4,
                      log_every=2, eval_context=2, eval_horizon=3, eval_figure=False, checkpoint_every=4,
                      progress=False)  # fmt: skip
    with Logger(run_dir) as logger:
        trainer.fit(collector, val_collector, model, logger, Checkpointer(run_dir, cfg, spec), resume_from)
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


@pytest.mark.parametrize("model_name", ["rssm", "mlp_ensemble"])
def test_a_model_that_draws_random_numbers_resumes_bit_identical(tmp_path, model_name, one_thread):
    """model=rssm samples its posterior and model=mlp_ensemble its bootstraps from torch's global RNG in every
    update: a resumed run draws what the uninterrupted run drew, and ends with the same weights, to the bit."""
    whole = tiny_run(tmp_path / "whole", model_name, steps=8)
    tiny_run(tmp_path / "run", model_name, steps=4)
    resumed = tiny_run(tmp_path / "run", model_name, steps=8, resume=True)  # seeded and built anew, as train.py does
    assert resumed["step"] == whole["step"] == 8
    assert_same_weights(whole, resumed)


def test_a_checkpoint_holds_the_stored_rows_in_place_and_one_in_the_earlier_format_resumes(tmp_path, one_thread):
    """A checkpoint writes the replay buffer's stored rows from where they are (ReplayBuffer.state_dict(copy=False)),
    so saving never holds a second copy of a buffer that may fill most of the memory. A checkpoint written before
    that, with the filled rows copied in logical order, resumes to the same bits."""
    whole = tiny_run(tmp_path / "whole", "mlp_ensemble", steps=8)
    tiny_run(tmp_path / "run", "mlp_ensemble", steps=4)
    path = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["buffer"]["format_version"] == TABLES_VERSION
    stored = sum(payload["buffer"]["sizes"])
    assert 0 < stored < 1000 and {sum(map(len, spans)) for spans in payload["buffer"]["tables"].values()} == {stored}
    earlier = ReplayBuffer(1000, 4, 2)
    earlier.load_state_dict(payload["buffer"])
    payload["buffer"] = earlier.state_dict()
    assert payload["buffer"]["format_version"] == TABLES_VERSION - 1
    atomic_torch_save(payload, path)
    resumed = tiny_run(tmp_path / "run", "mlp_ensemble", steps=8, resume=True)
    assert_same_weights(whole, resumed)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_a_resumed_run_lets_go_of_the_checkpoint_file_it_mapped(tmp_path, monkeypatch, one_thread):
    """train.py maps the checkpoint it resumes from. Kept mapped (by the optimizer's state, the loss window, the
    payload train.py holds), the file's disk space would outlive its pruning: a resumed run needed room for one
    checkpoint more than a run that never stopped, and failed on a disk the other fits."""
    tiny_run(tmp_path, "mlp_ensemble", steps=4)
    payload = load_for_resume(tmp_path, OmegaConf.create({"trainer": {"steps": 8}}), mmap=True)
    mapped = payload["path"]
    assert mapped in Path("/proc/self/maps").read_text()  # what the check below looks for, seen while mapped
    seen = []
    save = Checkpointer.save

    def save_and_look(self, state, step, final=False):
        seen.append(mapped in Path("/proc/self/maps").read_text())
        return save(self, state, step, final)

    monkeypatch.setattr(Checkpointer, "save", save_and_look)
    tiny_run(tmp_path, "mlp_ensemble", steps=8, resume=payload)  # train.py holds the payload for the whole run too
    assert seen == [False]


@pytest.mark.parametrize("env", ["env=cartpole", "env=pendulum"])
def test_vector_env_run_killed_and_resumed_is_bit_identical(tmp_path, env):
    """Four envs in one vector env (CartPole's own batched implementation; Pendulum's is gymnasium's SyncVectorEnv,
    built so that it pickles), float16 observation storage: the vector env, every stream's open episode and the
    credit of env steps carried between updates all survive."""
    fast = [*RUN, env, "env.num_envs=4", "buffer.obs_dtype=float16", "trainer.env_steps_per_update=3"]
    whole = tmp_path / "whole"
    run_train([*fast, f"hydra.run.dir={whole}"])
    run_dir = tmp_path / "run"
    proc = start_train([*fast, f"hydra.run.dir={run_dir}"])
    wait_for(run_dir / "checkpoints" / "step_00000120.pt", proc)
    proc.kill()
    proc.communicate()
    run_train([*fast, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    assert_same_run(whole, run_dir)
    assert scalars(whole)["data/env_steps"][-1][1] == 300 + 3 * 240  # prefill + 3 env steps per update, as run


def test_a_checkpoint_cut_inside_its_archive_is_reported_not_crashed_on(tmp_path, monkeypatch):
    """A zip whose table of contents is whole but whose pickle is cut can make torch raise a bare EOFError (no
    message); the user still gets the one-paragraph error naming the file."""
    from worldmodel.checkpoint import CheckpointUnreadable, read_checkpoint

    path = tmp_path / "cut.pt"
    torch.save({"format_version": 1}, path)

    def cut_pickle(*args, **kwargs):
        raise EOFError

    monkeypatch.setattr(torch, "load", cut_pickle)
    with pytest.raises(CheckpointUnreadable, match="cut.pt is unreadable or truncated \\(EOFError: \\)"):
        read_checkpoint(path)


def test_the_resume_command_of_a_run_composed_from_a_config_dir_of_its_own_runs(tmp_path):
    """Hydra's overrides leave out --config-dir (and --config-name): the printed command of a run made with
    `--config-dir my_conf env=mycart` failed to compose ("Could not find 'env/mycart'"). hydra.job.name is kept too."""
    conf = tmp_path / "my_conf"
    (conf / "env").mkdir(parents=True)
    (conf / "env" / "mycart.yaml").write_text((REPO / "conf" / "env" / "cartpole.yaml").read_text())
    run_dir = tmp_path / "run"
    args = ["--config-dir", str(conf), "env=mycart", "hydra.job.name=mine", *RUN, f"hydra.run.dir={run_dir}"]
    proc = start_train(args)
    wait_for(run_dir / "checkpoints" / "step_00000060.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    resume_cmd = printed_resume_args(err)
    assert f"--config-dir={conf}" in resume_cmd and "hydra.job.name=mine" in resume_cmd
    resumed = run_train(resume_cmd, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "checkpoints" / "last.pt").exists()
