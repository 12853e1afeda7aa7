"""scripts/collect.py -> scripts/train.py buffer.dataset=... -> scripts/evaluate.py, as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY, run_train
from conftest import run_script as script  # the other scripts, as a user runs them
from worldmodel import RandomPolicy, make_env


def test_collect_train_offline_and_evaluate(tmp_path):
    data = tmp_path / "cartpole.npz"
    proc = script("collect.py", ["env=cartpole", "episodes=60", "policy=sticky", f"out={data}", f"hydra.run.dir={tmp_path / 'c'}"])
    assert proc.returncode == 0, proc.stderr
    assert np.load(data)["lengths"].shape == (60,)
    again = script("collect.py", ["episodes=2", f"out={data}", f"hydra.run.dir={tmp_path / 'c2'}"])
    assert again.returncode == 2 and "never overwritten" in again.stderr

    run_dir = tmp_path / "run"  # offline: the dataset only, no env steps at all
    offline = run_train([*TINY, f"buffer.dataset={data}", "trainer.prefill=0", "trainer.env_steps_per_update=0",
                         "trainer.eval_horizon=5", f"hydra.run.dir={run_dir}"])  # fmt: skip
    recorded = int(np.load(data)["lengths"].sum())
    assert f"buffer: {recorded} transitions from the dataset" in offline.stdout + offline.stderr  # the log says so
    # The dataset moves; the run still resumes for more updates: its buffer comes from the checkpoint.
    moved = data.rename(tmp_path / "moved.npz")
    run_train([*TINY, f"buffer.dataset={data}", "trainer.prefill=0", "trainer.env_steps_per_update=0",
               "trainer.eval_horizon=5", f"hydra.run.dir={run_dir}", "trainer.steps=160", "trainer.resume=true"])  # fmt: skip
    ckpt = run_dir / "checkpoints" / "last.pt"
    assert torch.load(ckpt, weights_only=True)["loop"]["step"] == 160
    proc = script("evaluate.py", [f"checkpoint={ckpt}", f"data={moved}", "horizon=5", f"hydra.run.dir={tmp_path / 'e'}"])
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert set(metrics["nmse"]) == {"1", "5"} and set(metrics["copy_last_nmse"]) == {"1", "5"}
    assert metrics["nmse"]["1"] < metrics["copy_last_nmse"]["1"]
    assert "horizon" in proc.stdout and "copy-last" in proc.stdout
    # max_windows caps the windows scored (evenly spread): the full run above scored more than 3.
    assert metrics["windows"] > 3
    proc = script("evaluate.py", [f"checkpoint={ckpt}", f"data={moved}", "horizon=5", "max_windows=3",
                                  f"hydra.run.dir={tmp_path / 'e3'}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    capped = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert capped["windows"] == 3 and capped["windows_available"] == metrics["windows_available"] == metrics["windows"]
    assert f"3 of {metrics['windows']} (max_windows=3, evenly spread) windows" in proc.stdout

    # Into a directory that holds files (the training run's, or an earlier evaluation's): refused, nothing changed.
    for used in (run_dir, tmp_path / "e"):
        before = {p: p.read_bytes() for p in used.rglob("*") if p.is_file()}
        proc = script("evaluate.py", [f"checkpoint={ckpt}", f"data={moved}", f"hydra.run.dir={used}"])
        assert proc.returncode == 2 and f"hydra.run.dir={used} already holds files" in proc.stderr, proc.stderr
        assert {p: p.read_bytes() for p in used.rglob("*") if p.is_file()} == before


def test_evaluate_refuses_data_of_another_env(tmp_path):
    data = tmp_path / "pendulum.npz"
    assert script("collect.py", ["env=pendulum", "episodes=1", f"out={data}", f"hydra.run.dir={tmp_path / 'c'}"]).returncode == 0
    run_dir = tmp_path / "run"
    run_train([*TINY, "trainer.steps=10", f"hydra.run.dir={run_dir}"])
    proc = script("evaluate.py", [f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"data={data}",
                                  f"hydra.run.dir={tmp_path / 'e'}"])  # fmt: skip
    assert proc.returncode == 2 and "`obs` has shape [1, 201, 3]" in proc.stderr and "[N, T+1, 4]" in proc.stderr
    proc = script("evaluate.py", [f"checkpoint={tmp_path / 'none.pt'}", f"data={data}", f"hydra.run.dir={tmp_path / 'e2'}"])
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    if not torch.cuda.is_available():  # the key named is evaluate.yaml's own
        proc = script("evaluate.py", [f"checkpoint={tmp_path / 'none.pt'}", f"data={data}", "device=cuda",
                                      f"hydra.run.dir={tmp_path / 'e3'}"])  # fmt: skip
        assert proc.returncode == 2 and "`device=cuda`" in proc.stderr, proc.stderr


def test_collect_refuses_bad_values_and_never_records_a_training_runs_episodes(tmp_path):
    for override, key in (("sticky_prob=1.5", "sticky_prob"), ("seed=-1", "seed"), ("episodes=true", "episodes"),
                          ("env.max_episode_steps=1.5", "env.max_episode_steps"),
                          ("env.num_envs=4", "env.num_envs")):  # fmt: skip  (one env: 4 was ignored silently)
        proc = script("collect.py", [override, "policy=sticky", f"out={tmp_path / 'x.npz'}",
                                     f"hydra.run.dir={tmp_path / key}"])  # fmt: skip
        assert proc.returncode == 2 and f"`{override}`".lower() in proc.stderr.lower(), proc.stderr
        assert not (tmp_path / "x.npz").exists() and not (tmp_path / key).exists()  # refused before Hydra wrote
    data = tmp_path / "seed0.npz"
    assert script("collect.py", ["episodes=3", f"out={data}", f"hydra.run.dir={tmp_path / 'c'}"]).returncode == 0
    train_env = make_env("CartPole-v1", seed=0)  # as scripts/train.py seed=0 builds and first resets it
    first, _ = train_env.reset(seed=0)
    episodes = np.load(data)
    assert not np.allclose(episodes["obs"][0, 0], first)
    # Nor its actions: the policy is seeded apart from the training run's RandomPolicy(action_space, seed) too, or a
    # dataset of other starts would replay the training run's action sequence (all the recorded actions: dozens).
    recorded = np.concatenate([a[:n] for a, n in zip(episodes["actions"], episodes["lengths"])])
    train_policy = RandomPolicy(train_env.action_space, 0)
    assert not np.array_equal(recorded, [train_policy(None) for _ in recorded])


def test_paths_that_are_not_paths_or_cannot_be_written_are_refused_before_collecting(tmp_path):
    """Once a traceback from Path(None), or from writing the file after every episode was collected."""
    (tmp_path / "afile").write_text("")
    for out in ("null", "0", "''", f"{tmp_path / 'afile' / 'x.npz'}"):
        proc = script("collect.py", ["episodes=1", f"out={out}", f"hydra.run.dir={tmp_path / 'c'}"])
        assert proc.returncode == 2 and "`out=" in proc.stderr and "Traceback" not in proc.stderr, (out, proc.stderr)
        assert not (tmp_path / "c").exists()
    proc = script("evaluate.py", ["checkpoint=null", f"data={tmp_path / 'd.npz'}", f"hydra.run.dir={tmp_path / 'e'}"])
    assert proc.returncode == 2 and "`checkpoint=None`" in proc.stderr and "Traceback" not in proc.stderr


def test_paths_may_use_hydra_interpolations(tmp_path):
    """The pre-run checks resolve ${hydra:...} as the task does (they once ran before Hydra set its config, and
    refused every such value)."""
    assert script("collect.py", ["episodes=3", f"out={tmp_path}/${{hydra:job.name}}.npz",
                                 f"hydra.run.dir={tmp_path / 'c'}"]).returncode == 0  # fmt: skip
    (tmp_path / "collect.npz").rename(tmp_path / "train.npz")
    run_train([*TINY, "trainer.steps=10", f"buffer.dataset={tmp_path}/${{hydra:job.name}}.npz",
               f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip


def test_train_refuses_the_directory_of_a_collect_run(tmp_path):
    """collect.py's and evaluate.py's directories hold no checkpoint or TensorBoard log, but their .hydra/ records how
    they were run: a training run aimed there must not replace it."""
    run_dir = tmp_path / "c"
    assert script("collect.py", ["episodes=1", f"out={tmp_path / 'd.npz'}", f"hydra.run.dir={run_dir}"]).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_train([*TINY, "trainer.steps=10", f"hydra.run.dir={run_dir}"], check=False)
    assert proc.returncode == 2 and "holds the output of a collect.py run" in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_dataset_without_one_window_is_refused_before_anything_is_logged(tmp_path):
    """With trainer.prefill=0 the dataset alone must hold a window of trainer.seq_len; if not, the run says so before
    validating or logging, and its directory takes the corrected run."""
    data, run_dir = tmp_path / "d.npz", tmp_path / "run"
    assert script("collect.py", ["episodes=2", f"out={data}", f"hydra.run.dir={tmp_path / 'c'}"]).returncode == 0
    stored = int(np.load(data)["lengths"].sum())  # one stream (one env) holds both episodes
    args = [*TINY, "trainer.steps=10", "trainer.val_steps=400", f"buffer.dataset={data}", f"hydra.run.dir={run_dir}"]
    proc = run_train([*args, "trainer.prefill=0", f"trainer.seq_len={stored + 1}"], check=False)
    assert proc.returncode == 2 and "trainer.prefill=0" in proc.stderr and f"holds {stored} transitions" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(run_dir.glob("events.out.tfevents.*"))
    run_train([*args, "trainer.prefill=0", f"trainer.seq_len={stored}"])  # one window is enough, same directory


def test_collect_refuses_an_env_that_returns_nan_and_writes_no_dataset(tmp_path):
    data = tmp_path / "nan.npz"
    proc = script("collect.py", ["env.id=nan_env:NanCartPole-v0", "+env.kwargs.nan_after=5", "episodes=3",
                                 f"out={data}", f"hydra.run.dir={tmp_path / 'c'}"])  # fmt: skip
    assert proc.returncode == 2 and "NanCartPole-v0 returned NaN/inf values" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not data.exists()


def script_module(name: str):
    """scripts/NAME.py imported in this process: its Hydra main takes a composed config as cfg_passthrough."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_script(name: str, overrides: list[str], hydra: bool = False):
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=hydra)


def test_collect_records_the_episodes_of_its_seeded_env_and_policy(tmp_path, capsys):
    """collect.py seed=S policy=sticky sticky_prob=P: the episodes that make_env and StickyRandomPolicy seeded with
    S + DATASET_SEED_OFFSET and repeat_prob=P give, and a summary of them."""
    from worldmodel.dataset import collect_episodes
    from worldmodel.env import env_spec
    from worldmodel.rollout import StickyRandomPolicy
    from worldmodel.runtime import DATASET_SEED_OFFSET

    data = tmp_path / "d.npz"
    cfg = compose_script("collect", ["env=cartpole", "episodes=4", "policy=sticky", "sticky_prob=0.3", "seed=4",
                                     f"out={data}"])  # fmt: skip
    script_module("collect").main(cfg)
    seed = 4 + DATASET_SEED_OFFSET
    env = make_env("CartPole-v1", seed=seed)
    expected = collect_episodes(env, env_spec(env), StickyRandomPolicy(env.action_space, seed, repeat_prob=0.3), 4,
                                seed=seed)  # fmt: skip
    episodes = np.load(data)
    for key in ("obs", "actions", "rewards", "lengths"):
        np.testing.assert_array_equal(episodes[key], expected[key], err_msg=key)
    lengths = expected["lengths"]
    assert lengths.min() < lengths.max()  # so the summary's range has a direction
    out = capsys.readouterr().out
    assert (f"wrote {data}: 4 episodes of CartPole-v1 (sticky policy), {lengths.sum()} transitions, "
            f"length {lengths.min()}..{lengths.max()} (mean {lengths.mean():.1f})") in out


def test_evaluate_scores_a_checkpoint_and_writes_its_metrics(tmp_path, monkeypatch, capsys):
    """evaluate.py in this process, on a checkpoint of an untrained model and a dataset of short episodes: every
    window scored (none capped), metrics.json naming the checkpoint, data and env, and the same metrics returned."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from conftest import compose_config
    from worldmodel.checkpoint import FORMAT_VERSION
    from worldmodel.dataset import collect_episodes, save_dataset
    from worldmodel.env import env_spec

    env = make_env("Pendulum-v1", seed=0, max_episode_steps=10)
    spec = env_spec(env)
    data, ckpt, out_dir = tmp_path / "d.npz", tmp_path / "last.pt", tmp_path / "e"
    save_dataset(data, collect_episodes(env, spec, RandomPolicy(env.action_space, 0), 3, seed=0))
    model_cfg = compose_config(["env=pendulum"]).model
    model = instantiate(model_cfg, obs_dim=3, action_dim=1)
    torch.save({"format_version": FORMAT_VERSION, "model": model.state_dict(),
                "config": {"model": OmegaConf.to_container(model_cfg)},
                "env_spec": {"id": spec.id, "obs_dim": 3, "action_dim": 1, "discrete": False}}, ckpt)  # fmt: skip
    cfg = compose_script("evaluate", [f"checkpoint={ckpt}", f"data={data}", "context=3", "horizon=4", "device=cpu",
                                      f"hydra.run.dir={out_dir}"], hydra=True)  # fmt: skip
    cfg.hydra.runtime.output_dir = str(out_dir)
    out_dir.mkdir()
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    evaluate = script_module("evaluate")
    metrics = evaluate.main(cfg)
    assert json.loads((out_dir / "metrics.json").read_text()) == metrics
    assert (metrics["checkpoint"], metrics["data"], metrics["env"]) == (str(ckpt), str(data), "Pendulum-v1")
    assert metrics["windows"] == metrics["windows_available"] == 3 * (10 - 6 + 1)  # windows of 3 + 4 - 1 steps
    printed = capsys.readouterr().out
    assert "Pendulum-v1: 15 windows, context 3\n" in printed and "evenly spread" not in printed
    cfg.horizon = 9  # 3 + 9 - 1 = 11 steps: longer than every 10-step episode
    with pytest.raises(SystemExit) as stop:
        evaluate.main(cfg)
    assert stop.value.code == 2 and "no episode is 11 steps long, so no window of context 3 + horizon 9" in capsys.readouterr().err
    # A dataset of another env's kind of actions (Discrete indices for this Box env), named by evaluate's own key.
    indices = {**np.load(data), "actions": np.zeros((3, 10), np.int64)}
    np.savez(tmp_path / "indices.npz", **indices)
    cfg.horizon, cfg.data = 4, str(tmp_path / "indices.npz")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(cfg)
    expected = f"Dataset data={tmp_path / 'indices.npz'} holds integer action indices (a Discrete env's), but this env"
    assert stop.value.code == 2 and expected in capsys.readouterr().err
