"""validate_config: every value a run depends on is checked before the first env step or tensor allocation.

Hydra already refuses keys that are not in the config (a typo such as `trainer.stpes=5`); this checks the values, and
the keys added with `+` to a node that is built from its `_target_` (which would not take them).
"""

from __future__ import annotations

import difflib
import inspect
import math
import tempfile
import typing
from collections.abc import Mapping
from pathlib import Path

import hydra.utils
from omegaconf import DictConfig, OmegaConf

from worldmodel.checkpoint import require_checkpoint
from worldmodel.dataset import require_dataset
from worldmodel.env import VECTORIZATION_MODES, check_env_id, vectorization
from worldmodel.errors import ConfigError, WorldModelError
from worldmodel.replay import obs_storage_dtype
from worldmodel.rollout import POLICIES
from worldmodel.runtime import resolve_device
from worldmodel.trainer import COMPILE_MODES, GRAPHED_COMPILE_MODES, PRECISIONS


def _select(cfg: DictConfig, key: str, default=None):
    """cfg's value at `key` (`default` where there is no such key); a `???` left unset raises OmegaConf's error, which
    names the key: read as the default, it once passed the checks and failed in the run, after Hydra had written the
    run's directory."""
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=True)


def _not_a_string(value) -> str:
    """What to add to a message when a number or a bool arrived as a string (quoted on the command line, or read with
    ${oc.env:...}, which gives strings), since the value itself then prints as the number would."""
    return f", not the string '{value}'" if isinstance(value, str) else ""


def _int(cfg: DictConfig, key: str, minimum: int, why: str = "") -> int:
    value = _select(cfg, key)  # its errors name the key (cfg[...]'s may not)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}{why}{_not_a_string(value)}")
    return value


def _seed(cfg: DictConfig, key: str) -> int:
    """numpy seeds its global generator from 0 .. 2**32 - 1 only (np.random.seed)."""
    value = _int(cfg, key, 0)
    if value > 2**32 - 1:
        raise ConfigError(key, value, "an integer in 0 .. 2**32 - 1 (4294967295)")
    return value


def _number(cfg: DictConfig, key: str, valid: str, ok=lambda v: True) -> None:
    value = _select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise ConfigError(key, value, valid + _not_a_string(value))


def refuse_deleted_keys(overrides: list[str]) -> None:
    """`~model.head_layers` on the command line: a key the config files set, removed, is not missing to every reader.
    Many are read with a default (the constructor's, which may differ from the config file's: head_layers=2, MLP
    heads, against conf/model/gru.yaml's 1), so the run would silently be another experiment. Keys inside env.kwargs
    are the env's own options and may go; groups (~experiment) are not keys."""
    for override in overrides:
        key = override[1:].split("=", 1)[0] if override.startswith("~") else ""
        env_option = key == "env.kwargs" or key.startswith("env.kwargs.")
        if (key == "seed" or key.startswith(("env.", "buffer.", "model.", "trainer."))) and not env_option:
            raise ConfigError(key, f"(removed with {override})", f"a value: removed, the key would silently take "
                              f"its code default, which may differ from the config file's. Give {key}=<value> instead")


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: where a directory for it would be made from."""
    return next(p for p in [path, *path.absolute().parents] if p.exists())


def can_write_in(directory: Path) -> bool:
    """Whether this process can create a file in `directory`. os.access answers from permission bits, which root
    passes everywhere, /proc and /sys included: creating (and at once dropping) a nameless temporary file tells."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _path(cfg: DictConfig, key: str, what: str) -> str:
    value = _select(cfg, key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, f"{what}: a path")
    return value


#: Arguments train.py and collect.py pass to each group's _target_ themselves, from the env and the run, over any
#: value the group's node holds (hydra.utils.instantiate lets keyword arguments win): `+buffer.seed=5` or
#: `+env.seed=7` would be saved in the run's config, named in sweep job directories and shown in the HParams tab, while
#: the run used `seed` all the same.
SET_BY_SCRIPTS = {
    "env": ("seed",),
    "buffer": ("obs_dim", "action_dim", "seed", "streams", "batch_device", "discrete_actions", "capacity_key"),
    "model": ("obs_dim", "action_dim"),
}
#: Every argument a script passes to a _target_ (evaluate.py's own ReplayBuffer also names its device_key): not config
#: keys, so left out of the keys an error lists.
SCRIPT_ARGUMENTS = {*(key for keys in SET_BY_SCRIPTS.values() for key in keys), "device_key"}


def _built_from(cfg: DictConfig, group: str) -> tuple[DictConfig, str, object] | None:
    """The node of `group`, its `_target_` and what that names, or None for a node without one."""
    node = cfg.get(group)
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return None if target is None else (node, target, hydra.utils.get_method(target))


def _known_keys(cfg: DictConfig, group: str) -> None:
    """A key added with `+` to a node built from its `_target_` would reach the constructor, which refuses it with a
    traceback after the run directory is made (or, were it to take **kwargs, ignore it)."""
    if (built := _built_from(cfg, group)) is None:
        return
    node, target, constructor = built
    for key in SET_BY_SCRIPTS.get(group, ()):
        if key in node:
            given = OmegaConf.to_container(node, resolve=False)[key]
            instead = "set the top-level seed=... instead" if key == "seed" else "drop the override"
            raise ConfigError(f"{group}.{key}", given, f"no such key: the scripts pass {key} to {group} themselves, "
                              f"over this value, which would be silently ignored ({instead})")  # fmt: skip
    parameters = inspect.signature(constructor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    for key in node:  # _convert_, _recursive_...: instantiate's own keys, not the constructor's
        if not (str(key).startswith("_") and str(key).endswith("_")) and key not in parameters:
            known = sorted(k for k in parameters if k in node or k not in SCRIPT_ARGUMENTS)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {group}.{close[0]}?)" if close else ""
            given = OmegaConf.to_container(node, resolve=False)[key]
            raise ConfigError(f"{group}.{key}", given, f"a key that {target} takes{hint}: {', '.join(known)}")


def _validate_model(cfg: DictConfig) -> None:
    """The keys of whichever model config is chosen (conf/model/*.yaml); each model has only some of them."""
    model = cfg.model
    for key in ("latent_dim", "hidden_dim", "head_layers", "ensemble_size", "num_layers", "stoch_dim",
                "terminated_hidden", "open_loop_steps"):  # fmt: skip
        if key in model:
            _int(cfg, f"model.{key}", 0 if key == "open_loop_steps" else 1)
    for key in [k for k in model if str(k).endswith("_coef") or k == "free_nats"]:
        _number(cfg, f"model.{key}", "a finite number >= 0", lambda v: v >= 0)
    if "min_std" in model:
        _number(cfg, "model.min_std", "a finite number > 0", lambda v: v > 0)
    if "kl_balance" in model:
        _number(cfg, "model.kl_balance", "a number in [0, 1]", lambda v: 0 <= v <= 1)
    if model.get("propagation", "mean") not in ("mean", "members"):
        raise ConfigError("model.propagation", model.propagation, "mean or members")


def _declared_types(cfg: DictConfig, group: str) -> None:
    """A key whose constructor declares it `int`, `float` or `bool` gets a value of that type, for keys no check
    above knows (a model of one's own: `+model.my_width=abc` would reach the constructor as a string). Bounds are
    still the checks' own business: the type says nothing about them."""
    if (built := _built_from(cfg, group)) is None:
        return
    node, target, constructor = built
    try:
        hints = typing.get_type_hints(constructor.__init__ if inspect.isclass(constructor) else constructor)
    except Exception:  # an annotation that names what only a type checker imports: no types to hold the keys to
        return
    for key in node:
        kind, value = hints.get(str(key)), _select(cfg, f"{group}.{key}")
        number = not isinstance(value, bool) and isinstance(value, int | float)
        declared = f"({target} declares {getattr(kind, '__name__', kind)}){_not_a_string(value)}"
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{group}.{key}", value, f"true or false{_not_a_string(value)}")
        if kind is int and not (number and isinstance(value, int)):
            raise ConfigError(f"{group}.{key}", value, f"an integer {declared}")
        if kind is float and not (number and math.isfinite(value)):
            raise ConfigError(f"{group}.{key}", value, f"a finite number {declared}")


def validate_env(cfg: DictConfig) -> int:
    """The env group's values (conf/env/*.yaml), for every script that makes an env; returns env.num_envs."""
    _known_keys(cfg, "env")
    check_env_id(cfg.env.id)
    kwargs = _select(cfg, "env.kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError("env.kwargs", kwargs, "a mapping of keyword arguments for the env's constructor, e.g. "
                          "+env.kwargs.g=9.81 or 'env.kwargs={g: 9.81}'")  # fmt: skip
    envs = _int(cfg, "env.num_envs", 1) if "num_envs" in cfg.env else 1
    mode = _select(cfg, "env.vectorization_mode")
    if mode is not None and mode not in VECTORIZATION_MODES:
        raise ConfigError("env.vectorization_mode", mode, f"null (automatic) or one of {', '.join(VECTORIZATION_MODES)}")
    if _select(cfg, "env.max_episode_steps") is not None:
        _int(cfg, "env.max_episode_steps", 1, " or null (the env's own time limit)")
    return envs


def validate_config(cfg: DictConfig, here: bool = True) -> None:
    """Raises ConfigError for the first bad value. here=False: the run happens on another machine (a SLURM sweep's
    jobs), so the devices asked for are not checked against this one's."""
    t = cfg.trainer
    for group in ("buffer", "model", "trainer"):
        _known_keys(cfg, group)
    _seed(cfg, "seed")
    seq_len = _int(cfg, "trainer.seq_len", 1)
    envs = validate_env(cfg)
    if envs > 1:  # here, not in validate_env: collect.py refuses more than one env
        vectorization(cfg.env.id, _select(cfg, "env.vectorization_mode"))
    _int(cfg, "buffer.capacity", envs * seq_len, f" (env.num_envs={envs} streams x trainer.seq_len={seq_len}: each "
         "env's stream must hold one sequence)")  # fmt: skip
    resolve_device(_select(cfg, "buffer.device", default="auto"), key="buffer.device", here=here)
    obs_storage_dtype(_select(cfg, "buffer.obs_dtype", default="float32"))
    _int(cfg, "trainer.steps", 1)
    _int(cfg, "trainer.batch_size", 1)
    if _select(cfg, "buffer.dataset") is not None:
        _path(cfg, "buffer.dataset", "null (collect with the env) or an .npz episode dataset (scripts/collect.py)")
        _int(cfg, "trainer.prefill", 0)
        # A file is there or not on this machine only; and a resumed run does not read it again (it may have moved).
        if here and _select(cfg, "trainer.resume", default=False) is False:
            require_dataset(cfg.buffer.dataset)
    else:
        _int(cfg, "trainer.prefill", envs * seq_len, f" (at least env.num_envs={envs} x trainer.seq_len={seq_len}, so "
             "the first update can sample)")  # fmt: skip
    _int(cfg, "trainer.env_steps_per_update", 0)
    val_seq_len, val_key = seq_len, "trainer.seq_len"
    if _select(cfg, "trainer.val_seq_len") is not None:
        val_seq_len, val_key = _int(cfg, "trainer.val_seq_len", 1, " or null (trainer.seq_len)"), "trainer.val_seq_len"
    _int(cfg, "trainer.val_steps", val_seq_len, f" (at least {val_key}={val_seq_len}: one validation sequence)")
    _int(cfg, "trainer.eval_every", 1)
    _int(cfg, "trainer.log_every", 1)
    context, horizon = _int(cfg, "trainer.eval_context", 1), _int(cfg, "trainer.eval_horizon", 1)
    if context + horizon - 1 > t.val_steps:  # then no held-out episode could ever hold an evaluation window
        raise ConfigError("trainer.eval_horizon", horizon, f"at most trainer.val_steps - trainer.eval_context + 1 = "
                          f"{t.val_steps - context + 1}: an evaluation window is eval_context + eval_horizon - 1 "
                          f"held-out steps of one episode (or raise trainer.val_steps)")  # fmt: skip
    _int(cfg, "trainer.checkpoint_every", 1)
    _int(cfg, "trainer.keep_checkpoints", 1)
    if not (isinstance(_select(cfg, "trainer.resume", default=False), bool) or t.resume == "auto"):
        raise ConfigError("trainer.resume", t.resume, "true, false or auto (resume where the run directory holds a "
                          "checkpoint, else start fresh: for continuing a sweep)")  # fmt: skip
    for key in ("trainer.compile", "trainer.eval_figure", "trainer.progress", "model.bootstrap"):
        value = _select(cfg, key, default=False)
        if not isinstance(value, bool):
            raise ConfigError(key, value, f"true or false{_not_a_string(value)}")
    if _select(cfg, "trainer.precision", default="fp32") not in PRECISIONS:
        raise ConfigError("trainer.precision", t.precision, f"one of {', '.join(PRECISIONS)}")
    mode = _select(cfg, "trainer.compile_mode", default="default")
    if mode not in COMPILE_MODES:
        raise ConfigError("trainer.compile_mode", mode, f"one of {', '.join(COMPILE_MODES)}")
    _validate_model(cfg)
    _declared_types(cfg, "model")
    if cfg.model.get("open_loop_steps", 0) > seq_len - 1:  # an integer >= 0, checked just above
        raise ConfigError("model.open_loop_steps", cfg.model.open_loop_steps, f"at most trainer.seq_len - 1 = "
                          f"{seq_len - 1}: each training sequence's first step is observed, the rest may be imagined")  # fmt: skip
    for key in ("trainer.lr", "trainer.grad_clip"):
        _number(cfg, key, "a finite number > 0", lambda v: v > 0)
    device = resolve_device(t.device, here=here)
    graph = _select(cfg, "trainer.cuda_graph", default=False)
    if not (isinstance(graph, bool) or graph == "auto"):
        raise ConfigError("trainer.cuda_graph", graph, "auto (on with a CUDA device), true or false")
    if graph is True:
        if t.compile and mode in GRAPHED_COMPILE_MODES:
            raise ConfigError("trainer.compile_mode", mode, "default or max-autotune-no-cudagraphs with "
                              "trainer.cuda_graph=true, which records the whole update itself (the other modes record "
                              "CUDA graphs of their own inside it)")  # fmt: skip
        if device.type != "cuda" and (here or str(t.device) != "auto"):  # elsewhere, auto may still mean cuda
            raise ConfigError("trainer.cuda_graph", "true", f"false here: trainer.device={t.device} resolved to "
                              f"{device}, and CUDA graphs need a CUDA device")  # fmt: skip


def _required(cfg: DictConfig, key: str, what: str) -> str:
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(key, "???", f"{what}, given on the command line ({key}=...)")
    return _path(cfg, key, what)


def validate_collect(cfg: DictConfig) -> None:
    """scripts/collect.py's values (conf/collect.yaml), checked before Hydra writes its run directory."""
    out = Path(_required(cfg, "out", "the .npz file to write"))
    if out.exists():
        raise WorldModelError(f"out={cfg.out} already exists; datasets are never overwritten. Choose another path.")
    # Checked now, not after the episodes are collected: save_dataset creates the missing directories from here.
    nearest = nearest_existing(out)
    if not nearest.is_dir() or not can_write_in(nearest):
        raise ConfigError("out", cfg.out, f"a path this user can write: {nearest} is not a writable directory")
    for key, minimum in (("episodes", 1), ("seed", 0)):
        _int(cfg, key, minimum)
    if validate_env(cfg) != 1:
        raise ConfigError("env.num_envs", cfg.env.num_envs, "1: collect.py records whole episodes of one env, one "
                          "after another (episodes= sets how many)")  # fmt: skip
    if cfg.policy not in POLICIES:
        raise ConfigError("policy", cfg.policy, f"one of {', '.join(POLICIES)}")
    _number(cfg, "sticky_prob", "a number in [0, 1] (the chance of repeating the previous action)",
            lambda v: 0 <= v <= 1)  # fmt: skip


def validate_evaluate(cfg: DictConfig) -> None:
    """scripts/evaluate.py's values (conf/evaluate.yaml), checked before Hydra writes its run directory."""
    for key in ("context", "horizon", "max_windows"):
        _int(cfg, key, 1)
    resolve_device(cfg.device, key="device")
    _required(cfg, "checkpoint", "a run's checkpoints/last.pt (or a step_*.pt)")
    _required(cfg, "data", "an .npz episode dataset (scripts/collect.py)")
    require_checkpoint(cfg.checkpoint)
    require_dataset(cfg.data, key="data")
