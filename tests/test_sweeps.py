"""Sweeps as a user runs them: real multiruns (basic, Optuna, joblib, submitit_local), their job directories, event
files and HParams summaries, scripts/summarize.py on the result, and a requeued submitit job that resumes.

The launchers and the Optuna sweeper come with the `sweep` extra (pip install -e ".[sweep]"); tests that need one are
skipped, saying so, where it is not installed. Each real sweep takes 15-30 s on 2 CPU cores.
"""

from __future__ import annotations

import copy
import csv
import math
import re
import statistics
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

from conftest import REPO, TINY, hparams_experiment, raw_scalars, run_script, run_train, scalars, train_env
from worldmodel.errors import WorldModelError
from worldmodel.logger import Logger, flatten_config
from worldmodel.sweep import job_dirname

NEEDS_EXTRA = 'needs the sweep extra: pip install -e ".[sweep]"'

#: TINY with fewer and smaller updates, so that a job takes seconds; checkpoints every 10 updates for the requeue test.
SHORTER = {"trainer.steps": 20, "trainer.prefill": 200, "trainer.val_steps": 100, "trainer.eval_every": 10,
           "trainer.log_every": 5, "trainer.checkpoint_every": 10, "trainer.batch_size": 8,
           "trainer.seq_len": 8}  # fmt: skip

#: One torch thread per job: jobs side by side (joblib, submitit) then use a core each, as the README advises on
#: CPU-only machines, and tiny jobs stay quick on a busy machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SWEEP_TINY = [o for o in TINY if o.split("=")[0] not in SHORTER] + [f"{k}={v}" for k, v in SHORTER.items()]

#: Keys that job directory names leave out (conf/config.yaml: hydra.job.config.override_dirname.exclude_keys).
UNNAMED = {"hparams_search", "trainer.resume", "trainer.steps", "trainer.device", "trainer.progress",
           "trainer.log_every", "trainer.eval_every", "trainer.checkpoint_every", "trainer.keep_checkpoints"}  # fmt: skip

#: The part of every job's directory name that SWEEP_TINY contributes, e.g. "trainer.batch_size-8_trainer.prefill-200_...".
TINY_NAME = "_".join(sorted(o.replace("=", "-") for o in SWEEP_TINY if o.split("=")[0] not in UNNAMED))


def need(module: str):
    return pytest.importorskip(module, reason=f"{module} {NEEDS_EXTRA}")


def job_dirs(sweep):
    return sorted((p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: int(p.name.split("_")[0]))  # fmt: skip


def hparams_of(run_dir) -> dict:
    """The HParams tab's view of one run: {"hparams": {key: value}, "metrics": [tags], "status": int}."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    # No experiment summary: TensorBoard would take one job's as the whole sweep's (see Logger.log_hparams).
    assert set(content) == {hp_metadata.SESSION_START_INFO_TAG,
                            hp_metadata.SESSION_END_INFO_TAG}, f"no hparams summary in {run_dir}"  # fmt: skip
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    end = hp_metadata.parse_session_end_info_plugin_data(content[hp_metadata.SESSION_END_INFO_TAG])
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    metrics = [m.name.tag for m in hparams_experiment(run_dir).metric_infos]
    return {"hparams": values, "metrics": metrics, "status": end.status}


def check_job(job, expect_name: str):
    """A finished job: its readable name, one event file directly in it, no extra run directories, a checkpoint,
    and an HParams summary whose final val/loss is the last val/loss point."""
    assert job.name == expect_name
    assert len(list(job.glob("events.out.tfevents.*"))) == 1
    assert {p.name for p in job.iterdir() if p.is_dir()} == {".hydra", "checkpoints"}  # no add_hparams subdirectory
    assert (job / "checkpoints" / "last.pt").is_file()
    series = scalars(job)
    assert series["hparams/val/loss"][-1][1] == series["val/loss"][-1][1]
    hp = hparams_of(job)
    assert "hparams/val/loss" in hp["metrics"] and hp["status"] == 1  # STATUS_SUCCESS
    return hp, series["val/loss"][-1][1]


def summarize(sweep_dir, *args):
    return run_script("summarize.py", [str(sweep_dir), *args], timeout=120)


def _summarize_module():
    """scripts/summarize.py imported as a module (scripts/ is no package), for tests of its functions."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import summarize as module
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return module


def writers_named_in_creation_order(monkeypatch) -> None:
    """Each attempt of a run is a process writing one event file, and readers take a directory's files in name order.
    Writers made by one test share a process, named by a process-wide counter within one second: started at 0 for the
    test, it stays one digit, so name order is creation order (9 < 10 would not be, as strings)."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


def _logged_job(job: Path, overrides: list[str], seed: int | None, loss: float) -> None:
    """A finished job's directory: its overrides, its config's seed (none: no config.yaml), and its last val/loss."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if seed is not None:
        (job / ".hydra" / "config.yaml").write_text(f"seed: {seed}\ntrainer:\n  steps: 10\n")
    with Logger(job) as logger:
        logger.log({"val/loss": loss}, step=10)
        logger.log_hparams({"seed": seed or 0}, {"val/loss": loss}, step=10)


# --- no training: names, presets, hparams summaries, summarize's error ---------------------------------------------


def test_job_dirnames_are_readable_one_level_and_valid_hydra_values(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert job_dirname(3, "model.latent_dim-64_seed-1") == "3_model.latent_dim-64_seed-1"
    assert job_dirname(0, "") == "0"
    assert job_dirname(2, "trainer.lr-0.0012520653814999472_seed-0") == "2_trainer.lr-0.001252_seed-0"
    # Only decimals with more than 4 digits after the point are shortened: a value typed with 4 is shown as typed.
    typed = "trainer.grad_clip-12.5625_trainer.lr-0.0003"
    assert job_dirname(4, typed) == f"4_{typed}"
    odd = job_dirname(7, "env.id-ALE/Pong-v5_model.sizes-[8,16]_name-'a b=c'")
    assert odd == "7_env.id-ALE-Pong-v5_model.sizes--8-16-_name--a-b-c"
    long = job_dirname(12, "_".join(f"trainer.key{i}-{i}" for i in range(40)))
    assert len(long) <= 160 and long.startswith("12_trainer.key0-0_") and re.fullmatch(r".*-[0-9a-f]{8}", long)
    exactly = job_dirname(5, "x" * 158)  # 160 characters: the longest name kept whole
    assert exactly == "5_" + "x" * 158
    for name in (odd, long):
        # `hydra.run.dir=<job dir>` (how a job is resumed as a single run) parses as one plain value
        [override] = OverridesParser.create().parse_overrides([f"hydra.run.dir={tmp_path}/{name}"])
        assert not override.is_sweep_override() and override.value() == f"{tmp_path}/{name}"


def test_log_hparams_writes_into_the_runs_own_event_file(tmp_path):
    config = {"seed": 1, "model": {"latent_dim": 16, "lr": 1e-3}, "env": {"id": "CartPole-v1", "kwargs": {},
              "max_episode_steps": None}, "trainer": {"resume": False, "sizes": [8, 16]}}  # fmt: skip
    flat = flatten_config(config)
    assert flat == {"seed": 1, "model.latent_dim": 16, "model.lr": 1e-3, "env.id": "CartPole-v1", "env.kwargs": "{}",
                    "env.max_episode_steps": "null", "trainer.resume": "false", "trainer.sizes": "[8, 16]"}  # fmt: skip
    with Logger(tmp_path) as logger:
        logger.log({"val/loss": 0.5}, step=10)
        logger.log_hparams(config, {"val/loss": 0.5, "val/obs": 0.25}, step=10)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # SummaryWriter.add_hparams would add a subdirectory
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    hp = hparams_of(tmp_path)
    assert hp["hparams"] == {k: float(v) if isinstance(v, int | float) else v for k, v in flat.items()}
    assert hp["metrics"] == ["hparams/val/loss", "hparams/val/obs", "val/loss"]  # every scalar tag
    assert scalars(tmp_path)["hparams/val/obs"] == [(10, 0.25)]


def test_pruning_leaves_no_file_tensorboard_would_read_twice(tmp_path, monkeypatch):
    """A kill while a resumed run rewrites an event file leaves its temporary file behind: its name holds no
    "tfevents" (TensorBoard reads any such file, and would show every point twice), and the next prune removes it.
    A file with nothing to drop is not rewritten."""
    from worldmodel import logger as logger_module

    with Logger(tmp_path) as logger:
        for step in range(0, 50, 10):
            logger.log({"val/loss": float(step)}, step=step)
    event_file = next(tmp_path.glob("events.out.tfevents.*"))
    untouched = event_file.stat().st_mtime_ns
    logger_module.prune_events(tmp_path, 100)
    assert event_file.stat().st_mtime_ns == untouched

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(logger_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        logger_module.prune_events(tmp_path, 21)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if "tfevents" in p.name] == [event_file.name]
    (tmp_path / f".pruning-{event_file.name.removeprefix('events.out.tfevents.')}.tmp").write_bytes(b"left by a kill")
    logger_module.prune_events(tmp_path, 21)
    assert sorted(p.name for p in tmp_path.iterdir()) == [event_file.name]
    assert [step for step, _ in scalars(tmp_path)["val/loss"]] == [0, 10, 20]


def test_pruning_before_a_step_drops_that_step_and_later_ones_only(tmp_path):
    """A run resumed from the checkpoint of update 4 logs step 5 again: the killed attempt's points at step 5 and
    after must go (else the default loader shows step 5 twice), and the one before it, step 4, must stay."""
    from worldmodel import logger as logger_module

    with Logger(tmp_path) as logger:
        for step in (4, 5, 6):
            logger.log({"val/loss": float(step)}, step=step)
    logger_module.prune_events(tmp_path, before_step=5)
    assert raw_scalars(tmp_path)["val/loss"] == [(4, 4.0)]


def test_a_stale_pruning_file_goes_even_where_no_event_file_needs_rewriting(tmp_path):
    """A kill mid-prune leaves a whole event file's size under .pruning-*.tmp; the next prune removes it even when it
    has nothing to drop from the event files themselves (it rewrites none, so writes no file of that name)."""
    from worldmodel import logger as logger_module

    with Logger(tmp_path) as logger:
        logger.log({"val/loss": 1.0}, step=10)
    (tmp_path / ".pruning-left-by-a-kill.tmp").write_bytes(b"x" * 1000)
    logger_module.prune_events(tmp_path, before_step=100)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("events.out.tfevents.")] == []


def test_a_fresh_start_in_a_run_directory_drops_everything_logged_there_before(tmp_path):
    """trainer.resume=auto starts a run stopped before its first checkpoint over (purge_step=0): the stopped attempt's
    points must leave the files, since TensorBoard's default loader ignores the purge marker."""
    with Logger(tmp_path) as logger:
        for step in (10, 20):
            logger.log({"train/loss": float(step)}, step=step)
    with Logger(tmp_path, purge_step=0) as logger:
        logger.log({"train/loss": 5.0}, step=5)
    assert raw_scalars(tmp_path)["train/loss"] == [(5, 5.0)]


def test_only_finite_final_metrics_are_logged_for_the_hparams_tab(tmp_path):
    """A NaN final metric would sort first or last in the HParams table and in summarize.py: it is left out."""
    with Logger(tmp_path) as logger:
        logger.log_hparams({"seed": 0}, {"val/loss": float("nan"), "val/obs": 0.25, "eval/nmse_h15": float("inf")}, 10)
    assert set(raw_scalars(tmp_path)) == {"hparams/val/obs"}


def test_only_the_hparams_summary_marks_a_run_as_finished(tmp_path):
    """has_hparams tells train.py (trainer.resume=auto) whether a run killed after its final checkpoint still needs
    its summary: the config text every run writes at its start must not count."""
    from worldmodel.logger import has_hparams

    with Logger(tmp_path, config="seed: 0") as logger:
        logger.log({"val/loss": 0.5}, step=10)
    assert not has_hparams(tmp_path)
    with Logger(tmp_path) as logger:
        logger.log_hparams({"seed": 0}, {"val/loss": 0.5}, step=10)
    assert has_hparams(tmp_path)


def test_the_hparams_tab_shows_every_jobs_keys_and_metrics(tmp_path):
    """Jobs of one sweep may differ in their config keys and loss terms (model=gru,rssm): the table holds all of them,
    not the first job's alone."""
    for name, config, metrics in [("0_model-gru", {"model": {"latent_dim": 32, "head_layers": 1}}, {"val/obs": 0.5}),
                                  ("1_model-rssm", {"model": {"latent_dim": 32, "free_nats": 1.0}}, {"val/kl": 0.1})]:
        with Logger(tmp_path / name) as logger:  # fmt: skip
            logger.log_hparams(config, metrics, step=10)
    experiment = hparams_experiment(tmp_path)
    keys = sorted(h.name for h in experiment.hparam_infos)
    assert keys == ["model.free_nats", "model.head_layers", "model.latent_dim"]
    assert sorted(m.name.tag for m in experiment.metric_infos) == ["hparams/val/kl", "hparams/val/obs"]


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm", "submitit_local", "basic"])
def test_submitit_sweeps_resume_requeued_jobs_and_slurm_preset_composes(launcher):
    need("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from worldmodel.sweep import AUTO_RESUME, SweepCallback

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "seed=1"], return_hydra_config=True)
        explicit = compose("config", overrides=[f"hydra/launcher={launcher}", "trainer.resume=false"],
                           return_hydra_config=True)  # fmt: skip
    if launcher == "slurm":  # the preset: the plugin's schema, with this repo's defaults
        assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.max_num_timeout == 3
    SweepCallback().on_multirun_start(cfg)
    task = OmegaConf.to_container(cfg.hydra.overrides.task)  # as the sweeper reads it: unresolved
    assert (AUTO_RESUME in task) == (launcher != "basic")  # jobs that can be requeued resume
    SweepCallback().on_multirun_start(explicit)
    assert AUTO_RESUME not in OmegaConf.to_container(explicit.hydra.overrides.task)  # the user's own choice stands


def test_a_finished_run_continued_and_stopped_again_counts_as_unfinished(tmp_path, monkeypatch):
    """A run finished at update 10 (its hparams/* summary), then resumed for more updates and stopped at 30: its last
    val/* point is not the final one of any finished run, so summarize.py must not average it in; once the
    continued run finishes, it counts again."""
    writers_named_in_creation_order(monkeypatch)  # four writers, as four attempts of the run would make them
    read_finals = _summarize_module().read_finals
    with Logger(tmp_path) as logger:
        logger.log({"val/loss": 0.5}, step=0)
        logger.log({"val/loss": 0.25}, step=10)
        logger.log_hparams({"seed": 0}, {"val/loss": 0.25}, step=10)
    assert read_finals(tmp_path) == ({"val/loss": 0.25}, 10)
    with Logger(tmp_path, purge_step=11) as logger:  # trainer.resume=true trainer.steps=40, stopped at 15
        logger.log({"train/loss": 0.2}, step=15)  # before its next evaluation: no new val/* point yet
    assert read_finals(tmp_path) == ({"val/loss": 0.25}, None)
    with Logger(tmp_path, purge_step=16) as logger:  # resumed from 15, killed at 18 (no checkpoint after 15)
        logger.log({"val/loss": 9.0, "perf/updates_per_s": 5.0}, step=18)  # a tag with no point before 16
    with Logger(tmp_path, purge_step=16):  # resumed from 15 again and stopped before it logged anything: the killed
        pass  # attempt's point at 18 is hidden already
    assert read_finals(tmp_path) == ({"val/loss": 0.25}, None)
    with Logger(tmp_path, purge_step=16) as logger:  # resumed again, stopped at 30
        logger.log({"val/loss": 0.125}, step=20)
        logger.log({"val/loss": 0.0625, "train/loss": 0.1}, step=30)
    assert read_finals(tmp_path) == ({"val/loss": 0.0625}, None)
    with Logger(tmp_path, purge_step=31) as logger:
        logger.log({"val/loss": 0.03125, "train/loss": 0.05}, step=40)
        logger.log_hparams({"seed": 0}, {"val/loss": 0.03125}, step=40)
    assert read_finals(tmp_path) == ({"val/loss": 0.03125}, 40)


def test_summarize_names_every_job_it_leaves_out_and_calls_fixed_only_what_no_job_varied(tmp_path, capsys):
    """Three jobs of a sweep over trainer.lr: one finished, one diverged (no hparams/* summary), one failed before its
    logger started (a config, no event file). The table holds the first; the other two are named on stderr; and lr
    (varied by the diverged job) and latent_dim (by the job that failed before logging), though the one job shown has
    a single value of each, are not reported as fixed but shown as columns (an Optuna study whose one trial with another
batch size failed lost the key from both the table and the CSV)."""
    summarize_dir = _summarize_module().summarize
    for num, lr in enumerate(["0.001", "1e6", "0.01"]):
        job = tmp_path / f"{num}_trainer.lr-{lr}"
        (job / ".hydra").mkdir(parents=True)
        latent = 32 if num == 2 else 16
        (job / ".hydra" / "overrides.yaml").write_text(f"- trainer.lr={lr}\n- model.latent_dim={latent}\n- trainer.seq_len=8\n")
        if num < 2:
            with Logger(job) as logger:
                logger.log({"val/loss": 0.5, "train/loss": 0.4}, step=10)
                if num == 0:
                    logger.log_hparams({"seed": 0}, {"val/loss": 0.5}, step=10)
    groups, swept, fixed, tags = summarize_dir(tmp_path, "val/loss")
    err = capsys.readouterr().err
    assert [len(g.jobs) for g in groups] == [1] and fixed == {"trainer.seq_len": "8"}
    assert sorted(swept) == ["model.latent_dim", "trainer.lr"]  # columns, so the shown job's values are in the table
    assert "1_trainer.lr-1e6 did not finish" in err and "2_trainer.lr-0.01 has a config but no TensorBoard logs" in err


def test_summarize_finds_jobs_in_job_number_order_outside_hidden_folders(tmp_path):
    """Job 10 comes after job 2 (not between 1 and 2, as text would sort it): the CSV's runs column and each group's
    first job (whose typed values are plotted) follow launch order. Event files under a hidden folder (a copy kept in
    .old/, say) are not jobs."""
    find_job_dirs = _summarize_module().find_job_dirs
    for name in ("10_seed-10", "2_seed-2", "1_seed-1", ".old/3_seed-3", "0_seed-0/.hydra"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "events.out.tfevents.1.host").write_bytes(b"")
    assert [d.name for d in find_job_dirs(tmp_path)] == ["1_seed-1", "2_seed-2", "10_seed-10"]


def test_summarize_reads_a_job_whose_tag_lost_all_its_points_to_a_purge_marker(tmp_path, monkeypatch):
    """Event files written before pruning existed hold a resumed run's purge marker only: a tag whose every point came
    after the marker's step is still listed, with no points, and must be skipped, not read as [-1]."""
    from torch.utils.tensorboard import SummaryWriter

    writers_named_in_creation_order(monkeypatch)
    read_finals = _summarize_module().read_finals
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("val/loss", 1.0, 10)
        writer.add_scalar("val/late", 2.0, 30)
    with SummaryWriter(str(tmp_path), purge_step=20, filename_suffix=".resumed") as writer:
        writer.add_scalar("val/loss", 0.5, 20)
    finals, made = read_finals(tmp_path)
    assert finals == {"val/loss": 0.5} and made is None


def test_summarize_keeps_jobs_with_other_trainer_steps_apart(tmp_path):
    """trainer.steps is left out of job directory names (a continued sweep finds its jobs again), not out of what
    makes a configuration: a sweep over it was once averaged into one row as if its jobs were seeds."""
    summarize_dir = _summarize_module().summarize
    for num, steps in enumerate([20, 40]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- trainer.steps={steps}\n")
        (job / ".hydra" / "hydra.yaml").write_text(
            "hydra:\n  job:\n    config:\n      override_dirname:\n        exclude_keys: [trainer.resume, trainer.steps]\n")
        with Logger(job) as logger:
            logger.log({"val/loss": 1.0 / steps}, step=steps)
            logger.log_hparams({"seed": 0}, {"val/loss": 1.0 / steps}, step=steps)
    groups, swept, fixed, tags = summarize_dir(tmp_path, "val/loss")
    assert [len(g.jobs) for g in groups] == [1, 1] and list(swept) == ["trainer.steps"]


def test_summarize_labels_a_job_with_the_updates_it_made_not_the_last_commands_trainer_steps(tmp_path, capsys):
    """A sweep of 40 updates continued with trainer.steps=20 (its jobs had nothing left to do) saves steps 20 in each
    job's .hydra/; a job continued alone to 80, then the sweep again without trainer.steps, saves the default. The
    table labels each job with the updates its final summary was logged at. A directory of another script
    (evaluate.py, met under outputs/) is no training run that failed before logging: not reported as one."""
    summarize_dir = _summarize_module().summarize
    for num, (override, saved, made) in enumerate([("- trainer.steps=20\n", 20, 40), ("", 10000, 80)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"{override}- seed={num}\n")
        (job / ".hydra" / "config.yaml").write_text(f"trainer:\n  steps: {saved}\n")
        with Logger(job) as logger:
            logger.log({"val/loss": 1.0 / made}, step=made)
            logger.log_hparams({"seed": num}, {"val/loss": 1.0 / made}, step=made)
    other = tmp_path / "evaluate_run"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "overrides.yaml").write_text("- checkpoint=x.pt\n")
    (other / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: evaluate\n")
    groups, swept, fixed, tags = summarize_dir(tmp_path, "val/loss")
    assert swept == ["trainer.steps"] and [dict(g.config)["trainer.steps"] for g in groups] == ["80", "40"]
    assert "evaluate_run" not in capsys.readouterr().err


def test_summarize_counts_a_configuration_run_twice_with_one_seed_once(tmp_path, capsys):
    """An Optuna study whose searched keys are all categorical (trainer.lr fixed) may propose the same values twice:
    the two trials ran the same seed, so they are one sample, not n=2 "over seeds" with a spread of 0. Another seed
    of that configuration still counts."""
    summarize_dir = _summarize_module().summarize
    for num, (dim, seed, loss) in enumerate([(32, 1, 0.5), (64, 0, 0.25), (32, 1, 0.5), (32, 2, 0.75)]):
        _logged_job(tmp_path / f"{num}_model.latent_dim-{dim}_seed-{seed}", [f"model.latent_dim={dim}", f"seed={seed}"],
                    seed, loss)  # fmt: skip
    groups, swept, fixed, tags = summarize_dir(tmp_path, "val/loss")
    assert {dict(g.config)["model.latent_dim"]: [j.dir.name[0] for j in g.jobs] for g in groups} == {
        "64": ["1"], "32": ["0", "3"]}  # fmt: skip
    assert "2_model.latent_dim-32_seed-1 ran the configuration and seed of 0_model.latent_dim-32_seed-1" in (
        capsys.readouterr().err)  # fmt: skip


def test_summarize_counts_two_configurations_that_ran_one_seed_and_jobs_of_unknown_seed_apart(tmp_path, capsys):
    """Only the same configuration with the same seed is one sample: two configurations with seed 0 are two, and jobs
    whose seed is unknown (no .hydra/config.yaml) are never taken for repeats of each other."""
    for num, (dim, seed, loss) in enumerate([(32, 0, 0.5), (64, 0, 0.25), (16, None, 0.75), (16, None, 0.5)]):
        _logged_job(tmp_path / f"{num}_model.latent_dim-{dim}", [f"model.latent_dim={dim}"], seed, loss)
    groups, swept, fixed, tags = _summarize_module().summarize(tmp_path, "val/loss")
    assert {dict(g.config)["model.latent_dim"]: [j.dir.name[0] for j in g.jobs] for g in groups} == {
        "64": ["1"], "32": ["0"], "16": ["2", "3"]}  # fmt: skip
    assert "counted once" not in capsys.readouterr().err


def test_summarize_titles_the_plot_with_the_sweeps_own_name_when_given_as_a_dot(tmp_path, monkeypatch):
    """`summarize.py .` run inside the sweep's directory: the title names that directory, not an empty name."""
    sweep = tmp_path / "12-00-00"
    for num in range(2):
        _logged_job(sweep / f"{num}_model.latent_dim-{8 * (num + 1)}", [f"model.latent_dim={8 * (num + 1)}"], 0, 0.5)
    module = _summarize_module()
    titles = []
    monkeypatch.setattr(module, "write_plot", lambda path, groups, swept, metric, title: titles.append(title))
    monkeypatch.chdir(sweep)
    assert module.main(["."]) == 0
    assert titles == ["12-00-00: final val/loss, mean ± std over seeds (2 runs)"]


def test_summarize_ranks_by_any_scalar_tag(tmp_path):
    """val/loss is each model's own objective (the ensemble's an NLL); eval/nmse_h15 is the same figure for all."""
    summarize_dir = _summarize_module().summarize
    for num, (model, loss, nmse) in enumerate([("gru", 0.05, 0.02), ("mlp_ensemble", -2.6, 0.04)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n")
        with Logger(job) as logger:
            logger.log({"val/loss": loss, "eval/nmse_h15": nmse}, step=10)
            logger.log_hparams({"seed": 0}, {"val/loss": loss}, step=10)
    groups, swept, fixed, tags = summarize_dir(tmp_path, "eval/nmse_h15")
    assert [g.config for g in groups] == [(("model", "gru"),), (("model", "mlp_ensemble"),)] and tags[0] == "eval/nmse_h15"
    # A rate such as eval/terminated_recall is better high: ranked from the highest with --higher-is-better.
    proc = summarize(tmp_path, "--metric", "eval/nmse_h15", "--higher-is-better")
    assert proc.returncode == 0 and "higher is better" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("gru", "mlp_ensemble"))]
    assert [row.split()[0] for row in rows] == ["mlp_ensemble", "gru"]


def test_summarize_refuses_a_directory_without_runs(tmp_path):
    (tmp_path / "notes.txt").write_text("no runs here")
    proc = summarize(tmp_path)
    assert proc.returncode == 2 and "holds no runs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "summary.csv").exists()


def test_summarize_says_so_when_every_job_of_a_sweep_failed_before_logging(tmp_path):
    """A sweep whose every job failed before its logger started (an Optuna study whose trials all drew a refused
    value) is a sweep directory: the error says the jobs failed, not that this is no sweep's directory."""
    for num in range(2):
        (tmp_path / str(num) / ".hydra").mkdir(parents=True)
        (tmp_path / str(num) / ".hydra" / "overrides.yaml").write_text(f"- trainer.lr=-{num + 1}\n")
    proc = summarize(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "None of the 2 runs" in proc.stderr and "failed before training" in proc.stderr
    assert "holds no runs" not in proc.stderr


# --- real sweeps ------------------------------------------------------------------------------------------------------


def test_grid_sweep_names_jobs_logs_hparams_and_summarizes(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "model.latent_dim=8,16", "seed=0,1", *SWEEP_TINY, f"hydra.sweep.dir={sweep}"],
                     env_vars=ONE_THREAD)
    assert f"tensorboard --logdir {sweep}" in proc.stderr + proc.stdout  # the sweep says how to compare its jobs

    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    assert (sweep / "multirun.yaml").is_file()  # README, Where a sweep goes: the sweep's config (basic sweeper)
    finals, key_sets = {}, set()
    for num, (dim, seed) in enumerate([(8, 0), (8, 1), (16, 0), (16, 1)]):
        # 0_model.latent_dim-8_seed-0_trainer.batch_size-8_trainer.prefill-200_trainer.seq_len-8_trainer.val_steps-100
        hp, final = check_job(jobs[num], f"{num}_model.latent_dim-{dim}_seed-{seed}_{TINY_NAME}")
        assert hp["hparams"]["model.latent_dim"] == dim and hp["hparams"]["seed"] == seed
        key_sets.add(frozenset(hp["hparams"]))
        finals.setdefault(dim, []).append(final)
    assert len(key_sets) == 1  # one key set across the sweep: the HParams tab lines the jobs up

    proc = summarize(sweep)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["8"], ["16"])]
    assert sorted(r[0] for r in rows) == ["16", "8"] and all(r[1] == "2" for r in rows)  # 2 configs, n=2 seeds each
    with (sweep / "summary.csv").open() as f:
        table = {row["model.latent_dim"]: row for row in csv.DictReader(f)}
    assert set(table) == {"8", "16"}
    for dim, values in finals.items():
        row = table[str(dim)]
        assert row["n"] == "2"
        assert float(row["val/loss_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["val/loss_std"]) == pytest.approx(statistics.stdev(values))
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A job directory is a valid hydra.run.dir: the job continues as a single run, on the same curves.
    job = jobs[3]
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    overrides = [o for o in overrides if not o.startswith("trainer.steps=")]
    run_train([*overrides, f"hydra.run.dir={job}", "trainer.resume=true", "trainer.steps=30"], env_vars=ONE_THREAD)
    assert [step for step, _ in scalars(job)["val/loss"]] == [0, 10, 20, 30]


def test_a_failed_job_does_not_stop_the_others(tmp_path):
    """Job 0 diverges (lr 1e30): it prints its one-paragraph error and fails, and job 1 still trains to the end. The
    sweep then exits non-zero, naming the failed job (Hydra's report)."""
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "trainer.lr=1e30,0.001", *SWEEP_TINY, f"hydra.sweep.dir={sweep}"], check=False,
                     env_vars=ONE_THREAD)  # fmt: skip
    assert proc.returncode != 0
    assert "error: Training diverged" in proc.stderr
    jobs = job_dirs(sweep)
    assert len(jobs) == 2
    assert not (jobs[0] / "checkpoints" / "last.pt").exists() and (jobs[1] / "checkpoints" / "last.pt").exists()
    # summarize.py: the diverged job logged val/* points (step 0, 10) but never finished, so it is left out.
    proc = summarize(sweep)
    assert proc.returncode == 0, proc.stderr
    assert f"note: {jobs[0]} did not finish" in proc.stderr
    with open(sweep / "summary.csv") as f:
        assert [row["runs"] for row in csv.DictReader(f)] == [jobs[1].name]


def test_a_bad_value_anywhere_in_the_grid_stops_the_sweep_before_its_first_job(tmp_path):
    """Every job of a basic sweep is validated before the first starts: the error names the job and its overrides,
    and nothing is written."""
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "trainer.lr=0.001,-1", "model.latent_dim=8,16", *SWEEP_TINY, f"hydra.sweep.dir={sweep}"],
                     check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "error: sweep job 2 (trainer.lr=-1 model.latent_dim=8 " in proc.stderr
    assert "Invalid config `trainer.lr=-1`: expected a finite number > 0. No job was started." in proc.stderr
    assert not sweep.exists()


def test_the_grid_check_resolves_each_jobs_interpolations_in_that_job(tmp_path):
    """`trainer.val_steps=${trainer.batch_size}` is 64 in job 0 (valid with seq_len 40), not the sweep config's 32:
    the check must read overrides unresolved, as the sweeper does, and so finds the bad value in job 1."""
    grid = ["trainer.seq_len=40", "trainer.batch_size=64,128", "trainer.val_steps=${trainer.batch_size}",
            "trainer.lr=0.001,-1"]  # fmt: skip
    tiny = [o for o in SWEEP_TINY if not o.startswith("trainer.val_steps=")]
    proc = run_train(["-m", *tiny, *grid, f"hydra.sweep.dir={tmp_path / 'sweep'}"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "error: sweep job 1 (" in proc.stderr and "Invalid config `trainer.lr=-1`" in proc.stderr


def grid_check(task: list[str], params: dict | None = None):
    """check_sweep_jobs on the default config with these sweep overrides (and hydra.sweeper.params), in-process."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict, read_write

    from worldmodel.sweep import check_sweep_jobs

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.sweeper.params, cfg.hydra.overrides.task = params, task
        check_sweep_jobs(cfg)


def test_the_grid_check_numbers_jobs_as_the_basic_sweeper_launches_them():
    """The sweeper takes hydra.sweeper.params before the command line's overrides (an experiment preset's grid, then
    the user's): job 2 is lr=-1 with latent_dim=8, and the error must name that job."""
    with pytest.raises(WorldModelError, match=r"sweep job 2 \(trainer.lr=-1 model.latent_dim=8\)"):
        grid_check(["model.latent_dim=8,16"], {"trainer.lr": "0.001,-1"})


def test_a_job_that_resolves_only_where_it_runs_does_not_end_the_grid_check(monkeypatch):
    """Job 0 reads an environment variable set only on the cluster's nodes, so it cannot be checked here; job 1's bad
    value must still stop the sweep before it starts."""
    monkeypatch.delenv("WM_SET_ON_THE_NODES", raising=False)
    with pytest.raises(WorldModelError, match=r"sweep job 1 \(trainer.val_steps=200 trainer.lr=-1\)"):
        grid_check(["trainer.val_steps=${oc.env:WM_SET_ON_THE_NODES},200", "trainer.lr=-1"])


def test_an_optuna_trial_stopped_in_its_prefill_says_there_is_nothing_to_resume():
    """No checkpoint yet: no command that resumes the trial can be offered (its run directory is unknown here)."""
    from worldmodel.cli import _stopped_message
    from worldmodel.errors import RunInterrupted

    sweep = OmegaConf.create({"sweeper": {"storage": "sqlite:///study.db"}, "launcher": {"_target_": "x.BasicLauncher"},
                              "sweep": {"dir": "s"}})  # fmt: skip
    message = _stopped_message(RunInterrupted(15, 0, None), sweep)
    assert "during the prefill" in message and "nothing to resume" in message


def test_a_stopped_joblib_sweep_job_offers_the_sweep_command(tmp_path, monkeypatch):
    """joblib's workers share the sweep's command line and a stop ends the sweep, as for the basic launcher: the
    command offered continues the whole sweep with trainer.resume=auto, not the one job as a single run."""
    from worldmodel.cli import _stopped_message
    from worldmodel.errors import RunInterrupted

    monkeypatch.setattr("sys.argv", ["scripts/train.py", "-m", "seed=0,1", "trainer.resume=true"])
    sweep = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher."
                                                      "JoblibLauncher"}, "sweep": {"dir": str(tmp_path)}})  # fmt: skip
    stop = RunInterrupted(2, 30, tmp_path / "0_seed-0" / "checkpoints" / "step_00000030.pt")
    message = _stopped_message(stop, sweep)
    assert "Continue the sweep with:" in message
    assert message.endswith(f"python scripts/train.py -m seed=0,1 hydra.sweep.dir={tmp_path} trainer.resume=auto")


def test_the_grid_check_leaves_no_resolved_value_behind_for_the_jobs():
    """Jobs are composed from the sweep's config with its resolver cache: a value the check resolved there (a submitit
    job's trainer.resume, a ${now:} stamp) would be every job's, and a requeued job would not resume."""
    need("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from worldmodel.sweep import check_sweep_jobs
    from worldmodel.sweep import AUTO_RESUME, SweepCallback

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=submitit_local", "seed=1", "+stamp=${now:%H%M%S%f}"],
                      return_hydra_config=True)  # fmt: skip
        SweepCallback().on_multirun_start(cfg)
        assert AUTO_RESUME in OmegaConf.to_container(cfg.hydra.overrides.task)
        before = copy.deepcopy(OmegaConf.get_cache(cfg))  # Hydra's own ${now:} for the run dir, resolved already
        check_sweep_jobs(cfg)
    assert OmegaConf.get_cache(cfg) == before


def test_jobs_on_a_cluster_may_ask_for_devices_this_machine_lacks():
    """A SLURM sweep's jobs run on the cluster's nodes: the sweep-wide check leaves their devices to them, but still
    refuses a device name that exists nowhere."""
    need("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from worldmodel.sweep import task_config
    from worldmodel.config import validate_config
    from worldmodel.errors import ConfigError
    from worldmodel.sweep import jobs_run_here

    absent = f"cuda:{torch.cuda.device_count()}"  # one more GPU than this machine has
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfgs = {launcher: compose("config", overrides=[f"hydra/launcher={launcher}", f"trainer.device={absent}",
                                                       "trainer.cuda_graph=true"], return_hydra_config=True)
                for launcher in ("slurm", "submitit_local", "joblib", "basic")}  # fmt: skip
    assert {launcher: jobs_run_here(cfg) for launcher, cfg in cfgs.items()} == {
        "slurm": False, "submitit_local": True, "joblib": True, "basic": True}  # fmt: skip
    task = task_config(cfgs["slurm"])
    validate_config(task, here=False)
    with pytest.raises(ConfigError, match="trainer.device"):
        validate_config(task, here=True)
    task.trainer.device = "gpu"
    with pytest.raises(ConfigError, match="one of auto, cpu, cuda, cuda:N, mps"):
        validate_config(task, here=False)
    task.trainer.device = "cpu"  # wrong on every node
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        validate_config(task, here=False)
    task.trainer.device = "auto"  # a GPU node's auto is cuda
    validate_config(task, here=False)


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    need("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    # SWEEP_TINY fixes two keys of the search space (small, so trials are quick): Optuna searches the other two.
    run_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *SWEEP_TINY, f"hydra.sweep.dir={sweep}"],
              env_vars=ONE_THREAD)
    jobs = job_dirs(sweep)
    assert len(jobs) == 3
    searched = {"trainer.lr", "model.latent_dim"}
    finals = []
    for num, job in enumerate(jobs):
        params = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        assert searched <= set(params) and params["trainer.seq_len"] == "8" and params["trainer.batch_size"] == "8"
        assert job.name.startswith(f"{num}_model.latent_dim-{params['model.latent_dim']}_trainer.batch_size-8_")
        assert "hparams_search" not in job.name
        hp = hparams_of(job)
        assert hp["hparams"]["trainer.lr"] == pytest.approx(float(params["trainer.lr"]))
        finals.append(scalars(job)["val/loss"][-1][1])
    # README, Where a sweep goes: the Optuna sweeper writes optimization_results.yaml and no multirun.yaml.
    assert not (sweep / "multirun.yaml").exists()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == searched
    assert results["best_value"] == pytest.approx(min(finals))  # train.py's return value is what Optuna minimized


def test_a_diverged_optuna_trial_is_recorded_as_failed_and_the_study_goes_on(tmp_path):
    """With sampler seed 1 the third of three trials draws lr 1e30 and diverges (conf/hparams_search/optuna.yaml:
    max_failure_rate 1.0): the study still ends normally, with the best of the finished trials."""
    need("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    proc = run_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=1",
                      "trainer.lr=choice(1e30, 0.001)", "model.latent_dim=8", *SWEEP_TINY, f"hydra.sweep.dir={sweep}"],
                     env_vars=ONE_THREAD)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert output.count("error: Training diverged") == 1 and "Failed experiment: Training diverged" in output
    assert len(job_dirs(sweep)) == 3
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"]["trainer.lr"] == 0.001 and math.isfinite(results["best_value"])


def test_an_optuna_study_whose_every_trial_fails_ends_with_no_trials_completed(tmp_path):
    """README (Overrides and sweeps): a failed trial is recorded as failed and the search goes on; only if every trial
    fails does it end with Optuna's "No trials are completed yet". Every value of this searched lr is refused inside
    its trial (a searched key is left to the trials, not checked before the first), so each trial fails at once."""
    need("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    proc = run_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer.lr=choice(-1, -2)",
                      *SWEEP_TINY, f"hydra.sweep.dir={sweep}"], check=False, env_vars=ONE_THREAD)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "No job was started" not in proc.stderr  # not refused up front: both trials ran, and failed
    assert proc.stderr.count("error: Invalid config `trainer.lr=-") == 2
    assert (proc.stdout + proc.stderr).count("Failed experiment: Invalid config `trainer.lr=-") == 2  # Hydra's log
    assert "No trials are completed yet" in proc.stderr.strip().splitlines()[-1]
    assert len(job_dirs(sweep)) == 2 and not list(sweep.rglob("events.out.tfevents.*"))
    assert not (sweep / "optimization_results.yaml").exists() and not (sweep / "multirun.yaml").exists()


def test_joblib_runs_jobs_in_parallel_processes(tmp_path):
    need("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    run_train(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *SWEEP_TINY,
               f"hydra.sweep.dir={sweep}"], env_vars=ONE_THREAD)  # fmt: skip
    jobs = job_dirs(sweep)
    for num, job in enumerate(jobs):
        check_job(job, f"{num}_seed-{num}_{TINY_NAME}")
    pids = {next(job.glob("events.out.tfevents.*")).name.split(".")[-2] for job in jobs}
    assert len(jobs) == 2 and len(pids) == 2  # each job was written by its own worker process


def test_submitit_local_sweep_and_a_requeued_job_resumes(tmp_path):
    need("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    run_train(["-m", "hydra/launcher=submitit_local", "seed=0,1", *SWEEP_TINY, f"hydra.sweep.dir={sweep}"],
              env_vars=ONE_THREAD)
    jobs = job_dirs(sweep)
    assert len(jobs) == 2
    finals = [check_job(job, f"{num}_seed-{num}_{TINY_NAME}")[1] for num, job in enumerate(jobs)]
    assert finals[0] != finals[1]
    job_ids = [yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"] for job in jobs]
    for job_id in job_ids:  # submitit ran each job in its own process and collected its result
        assert (sweep / ".submitit" / job_id / f"{job_id}_0_result.pkl").is_file()
    job = jobs[0]
    assert "trainer.resume" in (job / ".hydra" / "overrides.yaml").read_text()  # added for submitit sweeps
    assert hparams_of(job)["hparams"]["trainer.resume"] == "auto"
    assert "resumed from" not in (job / "train.log").read_text()  # a first start trains from scratch

    # SLURM requeues a preempted job by running its batch script again: submitit loads the job's pickle and runs the
    # same job in the same directory. Here the job "was killed" right after its checkpoint at update 10.
    for name in ("step_00000020.pt", "last.pt"):
        (job / "checkpoints" / name).unlink()
    def requeue(job_id: str) -> None:
        env = train_env({**ONE_THREAD, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": job_id,
                         "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
                         "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_GLOBALID": "0"})  # fmt: skip
        rerun = subprocess.run([sys.executable, "-u", "-m", "submitit.core._submit", str(sweep / ".submitit" / "%j")],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    requeue(job_ids[0])
    assert "resumed from" in (job / "train.log").read_text() and "step_00000010.pt" in (job / "train.log").read_text()
    series = scalars(job)["val/loss"]
    assert [step for step, _ in series] == [0, 10, 20]  # the killed run's later points are purged, none twice
    assert series[-1][1] == finals[0]  # and the resumed job ends exactly where the uninterrupted one did
    assert (job / "checkpoints" / "last.pt").is_file() and len(job_dirs(sweep)) == 2  # same directory, no new one

    # Job 1 "was killed" before its first checkpoint: requeued, it starts over in its directory, and its curves show
    # that start only (the first attempt's points are hidden, none appears twice).
    shutil.rmtree(jobs[1] / "checkpoints")
    requeue(job_ids[1])
    series = scalars(jobs[1])["val/loss"]
    assert [step for step, _ in series] == [0, 10, 20] and series[-1][1] == finals[1]
    assert len(list(jobs[1].glob("events.out.tfevents.*"))) == 2  # both attempts' files are kept, nothing deleted


def stopped_in_its_first_job(args: list[str], sweep) -> tuple[int, str]:
    """Starts `train.py -m ARGS` (1000 updates a job), sends SIGINT once a job of `sweep` holds a checkpoint, and
    returns the exit code and stderr."""
    import signal
    import time

    from conftest import start_train
    from worldmodel.checkpoint import step_checkpoints

    longer = [o for o in SWEEP_TINY if not o.startswith("trainer.steps=")] + ["trainer.steps=1000"]
    proc = start_train(["-m", *args, *longer, f"hydra.sweep.dir={sweep}"])
    deadline = time.monotonic() + 120
    while not (sweep.is_dir() and any(step_checkpoints(job) for job in job_dirs(sweep))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_a_stopped_local_sweep_continues_with_the_command_it_prints(tmp_path):
    """Ctrl-C in job 0 of a local -m sweep ends the sweep (job 1 never starts). The command it prints, the sweep's
    own with trainer.resume=auto, resumes job 0 from its checkpoint and runs job 1; run once more, it finds both
    finished and changes no checkpoint."""
    from worldmodel.checkpoint import step_checkpoints

    sweep = tmp_path / "sweep"
    returncode, err = stopped_in_its_first_job(["seed=0,1"], sweep)
    assert returncode == 130 and "Continue the sweep with:" in err and "Traceback" not in err, err
    assert len(job_dirs(sweep)) == 1  # job 1 did not start
    stopped_at = step_checkpoints(job_dirs(sweep)[0])[-1][0]
    assert stopped_at < 1000
    command = shlex.split(err.split("Continue the sweep with:")[1].strip())
    assert command[:2] == ["python", str(REPO / "scripts" / "train.py")] and "trainer.resume=auto" in command
    run_train(command[2:], env_vars=ONE_THREAD)
    jobs = job_dirs(sweep)
    assert [step_checkpoints(job)[-1][0] for job in jobs] == [1000, 1000]
    assert f"step_{stopped_at:08d}.pt" in (jobs[0] / "train.log").read_text()  # resumed, not started over
    saved = {p: p.read_bytes() for job in jobs for p in (job / "checkpoints").iterdir()}
    again = run_train(command[2:], env_vars=ONE_THREAD)
    assert again.stdout.count("nothing to do") == 2
    assert {p: p.read_bytes() for job in jobs for p in (job / "checkpoints").iterdir()} == saved


def test_a_finished_sweep_continued_with_more_updates_trains_its_own_jobs_on(tmp_path):
    """trainer.steps is left out of job directory names, so the sweep's command with a larger trainer.steps and
    trainer.resume=auto finds each job's directory and continues it; it once started new jobs from scratch."""
    sweep = tmp_path / "sweep"
    run_train(["-m", "seed=0,1", *SWEEP_TINY, f"hydra.sweep.dir={sweep}"], env_vars=ONE_THREAD)
    names = [job.name for job in job_dirs(sweep)]
    longer = [o for o in SWEEP_TINY if not o.startswith("trainer.steps=")] + ["trainer.steps=40"]
    run_train(["-m", "seed=0,1", *longer, f"hydra.sweep.dir={sweep}", "trainer.resume=auto"], env_vars=ONE_THREAD)
    jobs = job_dirs(sweep)
    assert [job.name for job in jobs] == names
    for job in jobs:
        assert [s for s, _ in scalars(job)["val/loss"]] == [0, 10, 20, 30, 40]  # trained on from update 20
        assert "resumed from" in (job / "train.log").read_text()


@pytest.mark.parametrize("override", ["trainer.resume=auto", "trainer.resume='auto'", "++trainer.resume=auto"])
def test_a_sweep_continues_with_trainer_resume_auto_however_written(override):
    """PreflightChecks lets a sweep into a directory with earlier jobs' checkpoints when every job gets
    trainer.resume=auto, whichever way the command line spells it."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from worldmodel.sweep import continues_sweep

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for given, expected in ((override, True), ("trainer.resume=true", False), (None, False)):
            cfg = compose("config", overrides=["seed=0", *([given] if given else [])], return_hydra_config=True)
            assert continues_sweep(cfg) == expected, given


def test_a_value_every_optuna_trial_shares_is_refused_before_the_first(tmp_path):
    """Optuna draws each trial's values as it starts, so its jobs cannot be checked as a grid's are; but a bad value
    outside the search space would fail every trial in turn. It is refused before any, and no directory is made. A
    value that is only bad with some of the searched ones (prefill 20 is too small for seq_len 32) is left to them."""
    need("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    proc = run_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "trainer.grad_clip=-1",
                      *SWEEP_TINY, f"hydra.sweep.dir={sweep}"], check=False)  # fmt: skip
    assert proc.returncode == 2 and "trainer.grad_clip" in proc.stderr and "No job was started" in proc.stderr
    assert not sweep.exists()
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from worldmodel.sweep import check_sweep_jobs

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna", "trainer.prefill=10"], return_hydra_config=True)
        check_sweep_jobs(cfg)  # "at least ... trainer.seq_len=16": seq_len is searched, so this is left to the trials
        cfg = compose("config", overrides=["hparams_search=optuna", "trainer.log_every=0"], return_hydra_config=True)
        with pytest.raises(WorldModelError, match="trainer.log_every.*No job was started"):
            check_sweep_jobs(cfg)
        # A searched key fixed on the command line ("fix one searched key", README) is every trial's value: a bad one
        # failed each of the n_trials in turn, then ended with "No trials are completed yet".
        for fixed in ("trainer.lr=-1", "trainer.batch_size=0"):
            cfg = compose("config", overrides=["hparams_search=optuna", fixed], return_hydra_config=True)
            with pytest.raises(WorldModelError, match=f"{re.escape(fixed)}.*No job was started"):
                check_sweep_jobs(cfg)
        # Fixed but fine, with a shared value that is bad only with a key still searched: left to the trials.
        cfg = compose("config", overrides=["hparams_search=optuna", "trainer.batch_size=32", "trainer.prefill=10"],
                      return_hydra_config=True)  # fmt: skip
        check_sweep_jobs(cfg)


def test_resume_auto_does_not_continue_an_optuna_study_kept_in_storage(tmp_path, capsys):
    """Rerun in its directory, a stored study adds n_trials new trials numbered from job 0 again: one drawing the
    values of the earlier trial with its number would find that trial's finished directory and report its result to
    the study a second time. So trainer.resume=auto is refused there (an in-memory study replays its seeded trials,
    and resume=auto continues it; a new sweep directory is a fresh start)."""
    need("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_dir

    from worldmodel.cli import PreflightChecks

    sweep = tmp_path / "study"
    (sweep / "0_trainer.lr-0.001" / ".hydra").mkdir(parents=True)
    storage = f"hydra.sweeper.storage=sqlite:///{tmp_path / 'db'}"

    def preflight(*overrides: str) -> int:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):  # check_sweep_jobs composes
            cfg = compose("config", overrides=["hparams_search=optuna", *overrides], return_hydra_config=True)
            try:
                PreflightChecks().on_multirun_start(cfg)
            except SystemExit as stop:
                return stop.code
        return 0

    assert preflight(storage, f"hydra.sweep.dir={sweep}", "trainer.resume=auto") == 2
    err = capsys.readouterr().err
    assert "trainer.resume=auto does not continue an Optuna study kept in storage" in err and "Nothing was" in err
    assert preflight(f"hydra.sweep.dir={sweep}", "trainer.resume=auto") == 0  # in memory
    assert preflight(storage, f"hydra.sweep.dir={tmp_path / 'new'}", "trainer.resume=auto") == 0  # nothing to repeat
    assert preflight(storage, f"hydra.sweep.dir={sweep}") == 0  # no checkpoint there yet: trials are added


def test_a_stopped_optuna_trial_with_saved_storage_offers_the_trial_alone(tmp_path):
    """Rerun, a study kept in storage adds n_trials new trials (numbered from job 0 again, so a finished job would
    count twice) and leaves the stopped one RUNNING: the sweep command with trainer.resume=auto is not offered; the
    trial's own training is, as a single run that resumes it."""
    from worldmodel.checkpoint import step_checkpoints

    need("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'db'}"]
    returncode, err = stopped_in_its_first_job(args, sweep)
    assert returncode == 130 and "Continue the sweep with" not in err and "keeps the trial as RUNNING" in err, err
    command = shlex.split(err.split("Continue this trial's training alone with:")[1].splitlines()[1])
    [job] = job_dirs(sweep)
    assert f"hydra.run.dir={job}" in command and "trainer.resume=true" in command and "-m" not in command
    run_train(command[2:], env_vars=ONE_THREAD)
    assert step_checkpoints(job)[-1][0] == 1000


def test_the_optuna_search_scores_every_trial_on_windows_of_one_length():
    """The search varies trainer.seq_len and minimizes val/loss, whose windows were each trial's seq_len: a longer
    seq_len then scored lower on the same model and data by that alone (on Pendulum, a seq_len=32 trial ranked above
    a seq_len=8 one that was better on windows of 8, 16 and 32 alike)."""
    need("hydra_plugins.hydra_optuna_sweeper")
    from conftest import compose_config

    cfg = compose_config(["hparams_search=optuna", "trainer.seq_len=32"])
    assert cfg.trainer.val_seq_len == 16 and compose_config([]).trainer.val_seq_len is None


def test_summarize_says_when_val_metrics_of_a_seq_len_sweep_had_windows_of_each_jobs_seq_len(tmp_path, capsys):
    summarize_dir = _summarize_module().summarize
    for fixed in (None, 16):
        sweep = tmp_path / str(fixed)
        for num, seq_len in enumerate([8, 32]):
            _logged_job(sweep / f"{num}_trainer.seq_len-{seq_len}", [f"trainer.seq_len={seq_len}", "seed=0"], 0, 0.5)
            (sweep / f"{num}_trainer.seq_len-{seq_len}" / ".hydra" / "config.yaml").write_text(
                f"seed: 0\ntrainer:\n  seq_len: {seq_len}\n  val_seq_len: {'null' if fixed is None else fixed}\n")
        summarize_dir(sweep, "val/loss")
        assert ("windows of each job's own seq_len" in capsys.readouterr().err) == (fixed is None)
