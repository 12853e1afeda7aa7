"""Every option of every config group composes and instantiates; bad values are refused before any work."""

from __future__ import annotations

import os

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftest import CONF, compose_config
from worldmodel import ConfigError, ReplayBuffer, WorldModel, env_spec, make_env
from worldmodel.config import validate_config
from worldmodel.runtime import resolve_device
from worldmodel.trainer import Trainer

GROUPS = ["env", "buffer", "model", "trainer", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group_option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda go: "=".join(go))
def test_every_config_composes_and_instantiates(group_option):
    group, option = group_option
    cfg = compose_config([f"{group}={option}"])
    validate_config(cfg)
    env = instantiate(cfg.env, seed=cfg.seed)
    spec = env_spec(env)
    buffer = instantiate(cfg.buffer, obs_dim=spec.obs_dim, action_dim=spec.action_dim)
    model = instantiate(cfg.model, obs_dim=spec.obs_dim, action_dim=spec.action_dim)
    trainer = instantiate(cfg.trainer, device=resolve_device(cfg.trainer.device))
    assert isinstance(buffer, ReplayBuffer) and buffer.capacity == cfg.buffer.capacity
    assert isinstance(model, WorldModel)
    if "latent_dim" in cfg.model:  # a model of one's own need not have one
        assert model.latent_dim == cfg.model.latent_dim
    assert isinstance(trainer, Trainer) and trainer.steps == cfg.trainer.steps
    obs, _ = env.reset(seed=0)
    assert obs.reshape(-1).shape == (spec.obs_dim,)


def test_defaults_are_the_documented_ones():
    cfg = compose_config()
    assert cfg.env.id == "CartPole-v1"
    assert cfg.buffer._target_.endswith("ReplayBuffer") and cfg.model._target_.endswith("WorldModel")
    assert cfg.trainer.device == "auto" and cfg.seed == 0
    assert {"steps", "prefill", "batch_size", "seq_len", "lr", "env_steps_per_update"} <= set(cfg.trainer)


def test_users_example_overrides_apply():
    cfg = compose_config(["buffer.capacity=100000", "model.latent_dim=64"])
    assert cfg.buffer.capacity == 100000 and cfg.model.latent_dim == 64


def test_experiment_preset_switches_env():
    cfg = compose_config(["experiment=pendulum"])
    assert cfg.env.id == "Pendulum-v1" and cfg.trainer.seq_len == 32


@pytest.mark.parametrize("env_id, discrete", [("CartPole-v1", True), ("MountainCar-v0", True), ("Pendulum-v1", False)])
def test_any_gymnasium_id_works_through_env_id(env_id, discrete):
    cfg = compose_config([f"env.id={env_id}"])
    validate_config(cfg)
    spec = env_spec(instantiate(cfg.env, seed=0))
    assert spec.discrete is discrete and spec.id == env_id


def test_typo_in_key_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match="stpes"):
        compose_config(["trainer.stpes=5"])


def test_unknown_group_option_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match="cartpol"):
        compose_config(["env=cartpol"])


@pytest.mark.parametrize(
    "override, key, valid",
    [
        ("buffer.capacity=8", "buffer.capacity", "trainer.seq_len=16"),
        ("buffer.capacity=0", "buffer.capacity", ">= 16"),
        ("trainer.batch_size=0", "trainer.batch_size", ">= 1"),
        ("trainer.steps=-3", "trainer.steps", ">= 1"),
        ("trainer.lr=0", "trainer.lr", "> 0"),
        ("trainer.lr=nan", "trainer.lr", "finite"),
        ("trainer.prefill=3", "trainer.prefill", "trainer.seq_len"),
        ("trainer.seq_len=2.5", "trainer.seq_len", "integer"),
        ("trainer.device=tpu", "trainer.device", "auto, cpu, cuda"),
        ("env.id=CartPole-v9", "env.id", "registered gymnasium id"),
        ("env.id=NoSuchEnv-v0", "env.id", "registered gymnasium id"),
        ("env.num_envs=0", "env.num_envs", ">= 1"),
        ("env.max_episode_steps=0", "env.max_episode_steps", ">= 1 or null"),
        ("env.vectorization_mode=threads", "env.vectorization_mode", "sync, async"),
        ("buffer.obs_dtype=int8", "buffer.obs_dtype", "float32, float16, bfloat16"),
        ("buffer.device=tpu", "buffer.device", "auto, cpu, cuda"),
        ("trainer.precision=fp8", "trainer.precision", "fp32, bf16"),
        ("trainer.compile=maybe", "trainer.compile", "true or false"),
        ("trainer.resume=maybe", "trainer.resume", "true, false or auto"),
        ("trainer.resume=1", "trainer.resume", "true, false or auto"),
        ("trainer.compile_mode=fastest", "trainer.compile_mode", "default, max-autotune-no-cudagraphs"),
        ("trainer.cuda_graph=1", "trainer.cuda_graph", "auto (on with a CUDA device), true or false"),
        ("trainer.cuda_graph=on", "trainer.cuda_graph", "auto (on with a CUDA device), true or false"),
        ("trainer.cuda_graph=true trainer.device=cpu", "trainer.cuda_graph", "CUDA graphs need a CUDA device"),
        # Checked before the device: torch.compile's own CUDA graphs cannot be recorded inside the update's graph.
        ("trainer.cuda_graph=true trainer.compile=true trainer.compile_mode=reduce-overhead trainer.device=cpu",
         "trainer.compile_mode", "default or max-autotune-no-cudagraphs"),
        ("seed=4294967296", "seed", "an integer in 0 .. 2**32 - 1"),
        ("env.kwargs=5", "env.kwargs", "a mapping of keyword arguments"),
        ("model.head_layers=0", "model.head_layers", ">= 1"),
        ("model.reward_coef=abc", "model.reward_coef", "a finite number >= 0"),
        ("model.open_loop_steps=-1", "model.open_loop_steps", ">= 0"),
        ("model.open_loop_steps=16", "model.open_loop_steps", "at most trainer.seq_len - 1 = 15"),
        ("model.open_loop_steps=1 trainer.seq_len=1 trainer.prefill=100", "model.open_loop_steps", "= 0"),
        ("model=mlp_ensemble model.ensemble_size=0", "model.ensemble_size", ">= 1"),
        ("model=mlp_ensemble model.propagation=median", "model.propagation", "mean or members"),
        ("model=mlp_ensemble model.bootstrap=maybe", "model.bootstrap", "true or false"),
        ("model=rssm model.kl_balance=1.5", "model.kl_balance", "[0, 1]"),
        ("model=rssm model.kl_balance=-0.1", "model.kl_balance", "[0, 1]"),
        ("model=rssm model.min_std=0", "model.min_std", "> 0"),
        ("model=rssm model.free_nats=-1", "model.free_nats", ">= 0"),
        ("trainer.eval_figure=maybe", "trainer.eval_figure", "true or false"),
        ("trainer.progress=maybe", "trainer.progress", "true or false"),
        # 8 envs x seq_len 16: each env's stream must hold a sequence, and the prefill must fill every stream.
        ("env.num_envs=8 buffer.capacity=100", "buffer.capacity", "env.num_envs=8"),
        ("env.num_envs=8 trainer.prefill=100", "trainer.prefill", "env.num_envs=8"),
        # Keys added with + to a node built from its _target_, which would refuse them with a traceback.
        ("+trainer.stepz=5", "trainer.stepz", "a key that worldmodel.trainer.Trainer takes (did you mean trainer.steps?)"),
        ("+model.latnt_dim=5", "model.latnt_dim", "(did you mean model.latent_dim?)"),
        ("+buffer.foo=1", "buffer.foo", "a key that worldmodel.replay.ReplayBuffer takes: capacity, dataset, device, "
         "obs_dtype."),
        ("+env.foo=1", "env.foo", "worldmodel.env.make_env takes: id, kwargs, max_episode_steps, num_envs"),
        ("buffer.dataset=123", "buffer.dataset", "an .npz episode dataset (scripts/collect.py): a path"),
        ("buffer.dataset=''", "buffer.dataset", "a path"),
        ("trainer.eval_horizon=500 trainer.val_steps=200", "trainer.eval_horizon",
         "at most trainer.val_steps - trainer.eval_context + 1 = 196"),
        ("trainer.eval_context=5 trainer.eval_horizon=197 trainer.val_steps=200", "trainer.eval_horizon",
         "at most trainer.val_steps - trainer.eval_context + 1 = 196"),
        ("trainer.steps='20'", "trainer.steps", "an integer >= 1, not the string '20'"),
        ("trainer.compile='false'", "trainer.compile", "true or false, not the string 'false'"),
        # 0 would keep every checkpoint (step_files[:-0] prunes none) or divide by zero at the first update.
        ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints", ">= 1"),
        ("trainer.checkpoint_every=0", "trainer.checkpoint_every", ">= 1"),
    ],
)
def test_bad_values_name_the_key_and_what_is_valid(override, key, valid):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(override.split()))
    assert err.value.key == key
    assert key in str(err.value) and valid in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("+buffer.seed=5", "buffer.seed"),
        ("+env.seed=7", "env.seed"),
        ("+buffer.streams=4", "buffer.streams"),
        ("+model.obs_dim=9", "model.obs_dim"),
    ],
)
def test_keys_the_script_sets_itself_are_refused_not_ignored(override, key):
    """train.py passes seed (and the env's sizes, the streams) to the constructors itself, over whatever the node holds:
    `-m +env.seed=0,1,2` would run three identical jobs, each saved and named with another env.seed."""
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(override.split()))
    assert err.value.key == key and "silently ignored" in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.eval_context=5 trainer.eval_horizon=196 trainer.val_steps=200",
        "model=rssm model.kl_balance=0",
        "model=rssm model.kl_balance=1",
        "seed=4294967295",  # 2**32 - 1, the largest seed numpy takes
        "trainer.val_steps=16 trainer.eval_context=1 trainer.eval_horizon=16",  # one validation sequence of seq_len 16
        "trainer.env_steps_per_update=0",  # offline training: updates only, no env steps
    ],
)
def test_values_at_the_ends_of_their_ranges_are_accepted(override):
    """The bounds that error messages state are inclusive: a window of eval_context + eval_horizon - 1 = 200 steps
    fits in 200 held-out steps, and kl_balance may be 0 or 1 ("a number in [0, 1]"). An off-by-one in a check would
    refuse a value its own message calls valid."""
    validate_config(compose_config(override.split()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="no CUDA device"):
        validate_config(compose_config(["trainer.device=cuda"]))


def test_a_graphed_update_on_the_host_is_refused():
    """Trainer used from Python, where no config is validated, refuses trainer.cuda_graph on the host too."""
    trainer = Trainer(steps=1, prefill=0, batch_size=1, seq_len=1, lr=1e-3, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, not cpu"):
        trainer.build_update(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "device, compile_args, graphed",
    [
        ("cpu", {}, False),
        ("cuda", {}, True),
        ("cuda", {"compile": True}, True),
        ("cuda", {"compile": True, "compile_mode": "reduce-overhead"}, False),
        ("cuda", {"compile": True, "compile_mode": "max-autotune"}, False),
        ("cuda", {"compile": False, "compile_mode": "reduce-overhead"}, True),  # the mode means nothing uncompiled
    ],
)
def test_cuda_graph_auto_is_on_wherever_it_can_be(device, compile_args, graphed):
    """The default config's trainer.cuda_graph=auto: on with a CUDA device, off on the host and with the compile modes
    that record graphs of their own. Validation accepts it on either device (no GPU is needed to build a Trainer)."""
    trainer = Trainer(steps=1, prefill=0, batch_size=1, seq_len=1, lr=1e-3, device=device, cuda_graph="auto",
                      **compile_args)  # fmt: skip
    assert trainer.cuda_graph is graphed
    validate_config(compose_config(["trainer.device=cpu", "trainer.cuda_graph=auto"]))


def test_instantiate_keys_and_interpolations_pass_the_key_check():
    """_convert_, _recursive_... are hydra.utils.instantiate's own keys, not the constructor's."""
    validate_config(compose_config(["+model._convert_=all", "+buffer._recursive_=false", "+env._convert_=object"]))


class WidthModel(WorldModel):
    """A model of one's own, with keys no check in config.py knows (built only by its _target_ here)."""

    def __init__(self, obs_dim: int, action_dim: int, my_width: int = 8, my_scale: float = 1.0, my_flag: bool = False,
                 **rest):  # fmt: skip
        super().__init__(obs_dim, action_dim)


@pytest.mark.parametrize(
    "override, valid",
    [
        ("+model.my_width=abc", "an integer (test_config.WidthModel declares int), not the string 'abc'"),
        ("+model.my_width=1.5", "an integer (test_config.WidthModel declares int)"),
        ("+model.my_scale=abc", "a finite number (test_config.WidthModel declares float), not the string 'abc'"),
        ("+model.my_scale=inf", "a finite number"),
        ("+model.my_flag=1", "true or false"),
    ],
)
def test_a_new_models_own_keys_get_the_types_its_constructor_declares(override, valid):
    """config._validate_model knows the bounds of the keys of gru, rssm and mlp_ensemble; a new model's own keys are
    at least held to the types its signature declares, before a string reaches its constructor."""
    model = ["model._target_=test_config.WidthModel"]
    validate_config(compose_config([*model, "+model.my_width=16", "+model.my_scale=2", "+model.my_flag=true"]))
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config([*model, override]))
    assert err.value.key == override[1:].split("=")[0] and valid in str(err.value)


def test_a_value_that_cannot_be_resolved_names_its_key():
    """Every key is read so that OmegaConf's error carries the full key (DictConfig.get's does not)."""
    for key in ("buffer.obs_dtype", "buffer.dataset", "buffer.device", "trainer.precision", "trainer.compile_mode",
                "trainer.resume", "trainer.cuda_graph", "env.kwargs", "env.vectorization_mode"):  # fmt: skip
        with pytest.raises(OmegaConfBaseException) as err:
            validate_config(compose_config([f"{key}=${{oc.env:WM_NO_SUCH_VARIABLE}}"]))
        assert err.value.full_key == key


def test_a_custom_env_module_that_is_missing_or_registers_nothing_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"must be on the path: PYTHONPATH=\. python"):
        validate_config(compose_config(["env.id=no_such_module_here:MyEnv-v0"]))
    with pytest.raises(ConfigError, match=r"registers MyEnv-v0 when imported .*json was imported, but"):
        validate_config(compose_config(["env.id=json:MyEnv-v0"]))  # importable, registers nothing
    with pytest.raises(ConfigError, match=r"Did you mean CartPole-v1"):  # gymnasium's diagnosis and the hint stay
        validate_config(compose_config(["env.id=json:CartPol-v1"]))
    (tmp_path / "brokenenv.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:  # found, but a package it imports is missing: not a path problem
        validate_config(compose_config(["env.id=brokenenv:MyEnv-v0"]))
    assert "not_installed_dep_xyz" in str(err.value) and "PYTHONPATH" not in str(err.value)
    validate_config(compose_config(["env.id=nan_env:NanCartPole-v0"]))  # tests/ is on the path here


def test_misspelled_env_id_gets_a_suggestion():
    with pytest.raises(ConfigError, match="CartPole-v1"):
        validate_config(compose_config(["env.id=Cartpole-v1"]))


def test_resolved_config_is_plain_yaml():
    # The run logs and checkpoints the resolved config: it must resolve without the Hydra runtime.
    cfg = compose_config()
    assert "_target_" in OmegaConf.to_yaml(cfg, resolve=True)


@pytest.mark.parametrize("config_name", ["config", "evaluate", "collect"])
def test_default_directories_of_runs_started_in_the_same_second_differ(config_name):
    """Two runs started together (a shell loop with &) must not share a default run or sweep directory: the second
    would be refused, or, for sweeps, its jobs would write into the first one's job directories."""
    from hydra import compose, initialize_config_dir

    dirs = []
    for _ in range(2):  # a fresh compose each: ${now:} is resolved once per config
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=config_name, return_hydra_config=True)
        dirs.append([str(OmegaConf.select(cfg, f"hydra.{k}.dir")) for k in ("run", "sweep")])
    assert all(a != b for a, b in zip(*dirs)), dirs


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_collect_refuses_an_out_directory_where_no_file_can_be_made(tmp_path):
    """Permission bits say yes to root everywhere, but /proc takes no new file from anyone: found before collecting,
    not when the dataset is written after the last episode."""
    from hydra import compose, initialize_config_dir

    from worldmodel.config import validate_collect

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigError, match="/proc is not a writable directory"):
            validate_collect(compose(config_name="collect", overrides=["out=/proc/new/d.npz"]))
        validate_collect(compose(config_name="collect", overrides=[f"out={tmp_path / 'new' / 'd.npz'}"]))
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind


def test_collect_and_evaluate_values_are_checked_at_both_ends_of_their_ranges(tmp_path):
    """sticky_prob is "a number in [0, 1]": 1 (always repeat) is valid. evaluate.py's max_windows must be >= 1, found
    before the checkpoint and the data are even looked at."""
    from hydra import compose, initialize_config_dir

    from worldmodel.config import validate_collect, validate_evaluate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        out = f"out={tmp_path / 'd.npz'}"
        for prob in (0, 1):
            validate_collect(compose(config_name="collect", overrides=[out, "policy=sticky", f"sticky_prob={prob}"]))
        with pytest.raises(ConfigError, match="sticky_prob"):
            validate_collect(compose(config_name="collect", overrides=[out, "policy=sticky", "sticky_prob=1.01"]))
        paths = [f"checkpoint={tmp_path / 'c.pt'}", f"data={tmp_path / 'd.npz'}"]
        with pytest.raises(ConfigError) as err:
            validate_evaluate(compose(config_name="evaluate", overrides=[*paths, "max_windows=0"]))
        assert err.value.key == "max_windows"


def test_only_run_values_removed_with_a_tilde_are_refused():
    """`~seed` or `~trainer.lr` would silently run with the code's default; the env's own options (env.kwargs, the
    whole node or one key) may go, as may a group (~experiment)."""
    from worldmodel.config import refuse_deleted_keys

    for override in ("~seed", "~trainer.lr", "~env.id", "~model.head_layers=1", "~buffer.capacity"):
        with pytest.raises(ConfigError, match="removed with"):
            refuse_deleted_keys([override])
    refuse_deleted_keys(["~env.kwargs", "~env.kwargs.g", "~experiment", "seed=3", "trainer.lr=0.1"])


def test_env_mistakes_found_from_the_registry_are_refused_before_the_run(tmp_path):
    """A vector mode the env lacks is caught by the pre-run checks (so a -m grid is refused before its first job), and
    errors about a vector env name the env the user gave, not gymnasium's wrapper class."""
    cfg = compose_config(["env=pendulum", "env.num_envs=2", "env.vectorization_mode=vector_entry_point"])
    with pytest.raises(ConfigError, match="env.vectorization_mode=vector_entry_point.*Pendulum-v1 has no batched"):
        validate_config(cfg)
    validate_config(compose_config(["env=cartpole", "env.num_envs=2", "env.vectorization_mode=vector_entry_point"]))
    from hydra import compose, initialize_config_dir

    from worldmodel.config import validate_collect

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # collect.py makes one env: not its concern
        validate_collect(compose(config_name="collect", overrides=[
            f"out={tmp_path / 'd.npz'}", "env=pendulum", "env.vectorization_mode=vector_entry_point"]))
        with pytest.raises(ConfigError, match="`env.num_envs=2`: expected 1: collect.py records whole episodes"):
            validate_collect(compose(config_name="collect", overrides=[f"out={tmp_path / 'd.npz'}", "env.num_envs=2"]))
    with pytest.raises(ConfigError, match="`env.id=FrozenLake-v1`"):  # Discrete observations, built as SyncVectorEnv
        make_env("FrozenLake-v1", seed=0, num_envs=2)
    assert env_spec(make_env("Pendulum-v1", seed=0, num_envs=2)).id == "Pendulum-v1"


def test_a_missing_dataset_is_refused_by_the_pre_run_checks_unless_the_run_resumes(tmp_path):
    """Found before Hydra writes the run dir, when the file would be read; a resumed run does not read it, and a SLURM
    sweep's jobs run where the file may be."""
    from worldmodel.dataset import DatasetError

    missing = f"buffer.dataset={tmp_path / 'gone.npz'}"
    with pytest.raises(DatasetError, match="buffer.dataset=.*gone.npz does not exist"):
        validate_config(compose_config([missing, "trainer.prefill=0"]))
    for ok in (["trainer.resume=true"], ["trainer.resume=auto"]):
        validate_config(compose_config([missing, "trainer.prefill=0", *ok]))
    validate_config(compose_config([missing, "trainer.prefill=0"]), here=False)


def test_a_dataset_too_large_for_the_buffer_names_the_capacity_given(tmp_path):
    """The capacity is split evenly over the streams (rounded down); the error must quote the user's value."""
    from worldmodel import RandomPolicy
    from worldmodel.dataset import collect_episodes, save_dataset

    env = make_env("Pendulum-v1", seed=0)
    save_dataset(tmp_path / "d.npz", collect_episodes(env, env_spec(env), RandomPolicy(env.action_space, 0), 3, seed=0))
    ReplayBuffer(600, 3, 1, streams=3, dataset=tmp_path / "d.npz")  # 200-step episodes, one per stream: fits
    with pytest.raises(ConfigError, match=r"`buffer.capacity=601`: expected at least 800 .* 4 stream\(s\)"):
        ReplayBuffer(601, 3, 1, streams=4, dataset=tmp_path / "d.npz")  # 150 rows per stream


@pytest.mark.parametrize("key", ["model.latent_dim", "model.hidden_dim", "buffer.obs_dtype", "buffer.device", "trainer.precision",
                                 "trainer.cuda_graph", "env.kwargs", "buffer.dataset"])
def test_a_key_left_unset_is_named_as_one_with_no_value(key):
    """`???` once read as None in the check of the constructor's declared types ('model.latent_dim=None: expected an
    integer', a value the user never gave), or as the check's default (buffer.obs_dtype: float32), to fail in the run
    after Hydra wrote its directory. OmegaConf's error names the key, and cli says it has no usable value."""
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue) as err:
        validate_config(compose_config([f"{key}=???"]))
    assert err.value.full_key == key
