"""make_env: a seeded gymnasium env, plus the shapes the rest of the pipeline needs from it."""

from __future__ import annotations

import atexit
import contextlib
import difflib
import functools
import importlib
import signal
import weakref
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from worldmodel.errors import ConfigError
from worldmodel.runtime import rng_state, set_rng_state


@dataclass(frozen=True)
class EnvSpec:
    """What the buffer and model need to know about an env: flat observation and action vector widths.

    Discrete actions are stored and fed to the model as one-hot vectors (an integer index would tell the model that
    action 2 is "between" 1 and 3); Box actions are flattened vectors.
    """

    id: str
    obs_dim: int
    action_dim: int
    discrete: bool

    def encode_action(self, action: Any) -> np.ndarray:
        if self.discrete:
            one_hot = np.zeros(self.action_dim, dtype=np.float32)
            one_hot[int(action)] = 1.0
            return one_hot
        return np.asarray(action, dtype=np.float32).reshape(self.action_dim)


def check_env_id(env_id: str) -> None:
    """Fails fast, before anything is built, if `env.id` is not a registered gymnasium id.

    Custom envs use gymnasium's "module:EnvId" form: the module is imported first, and registers EnvId.
    """
    env_id, module = str(env_id), None
    if ":" in env_id:
        module, env_id = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as err:
            # Not found itself (rather than a package it imports): scripts run from scripts/, not the repo root.
            missing = isinstance(err, ModuleNotFoundError) and (module + ".").startswith(f"{err.name}.")
            where = "; a module of your own must be on the path: PYTHONPATH=. python scripts/train.py ..." if missing else ""
            raise ConfigError(
                "env.id", f"{module}:{env_id}", f"an importable module before the colon that registers {env_id} "
                f"(importing {module} failed: {err}{where})"
            ) from None
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        close = difflib.get_close_matches(str(env_id), list(gym.registry), n=3, cutoff=0.6)
        hint = f"Did you mean {', '.join(close)}? " if close else ""
        if module is not None:
            raise ConfigError("env.id", f"{module}:{env_id}", f"a module that registers {env_id} when imported "
                              f"(gymnasium.register('{env_id}', entry_point=...)): {module} was imported, but {err}. "
                              f"{hint}".rstrip()) from None  # fmt: skip
        raise ConfigError(
            "env.id",
            env_id,
            f"a registered gymnasium id such as CartPole-v1 or Pendulum-v1 ({err}). {hint}"
            "The env configs under conf/env/ list tested ones; `python -c \"import gymnasium; "
            "gymnasium.pprint_registry()\"` lists all",
        ) from None


def env_spec(env: gym.Env | gym.vector.VectorEnv) -> EnvSpec:
    """Reads observation/action widths (of one env of a vector env), refusing spaces the model cannot consume."""
    env_id = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
    if isinstance(env, gym.vector.VectorEnv):
        obs_space, act_space = env.single_observation_space, env.single_action_space
    else:
        obs_space, act_space = env.observation_space, env.action_space
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError(
            "env.id", env_id, f"an env with Box (vector) observations; this one has {obs_space}"
        )
    if isinstance(act_space, gym.spaces.Discrete):
        if int(act_space.start) != 0:  # one-hot slots, datasets and policies all count actions from 0
            raise ConfigError("env.id", env_id, f"an env whose Discrete actions start at 0; this one has {act_space}: "
                              "wrap it in a gymnasium.ActionWrapper that shifts them")  # fmt: skip
        return EnvSpec(env_id, int(np.prod(obs_space.shape)), int(act_space.n), discrete=True)
    if isinstance(act_space, gym.spaces.Box):
        return EnvSpec(env_id, int(np.prod(obs_space.shape)), int(np.prod(act_space.shape)), discrete=False)
    raise ConfigError("env.id", env_id, f"an env with Discrete or Box actions; this one has {act_space}")


VECTORIZATION_MODES = ("vector_entry_point", "sync", "async")


def make_env(
    id: str,
    seed: int,
    max_episode_steps: int | None = None,
    kwargs: dict | None = None,
    num_envs: int = 1,
    vectorization_mode: str | None = None,
) -> gym.Env | gym.vector.VectorEnv:
    """Builds `id` with env.action_space seeded, for code that samples it directly (RandomPolicy seeds a copy of its
    own).

    With num_envs > 1 it builds a gymnasium vector env: by default the env's own batched implementation where it
    has one (`vector_entry_point`, e.g. CartPole steps all envs in one numpy call), else `sync` (one process);
    `async` runs each env in its own process, which pays off only for slow envs.
    The observation stream is seeded by the collector's first `reset(seed=...)`, the gymnasium>=1.0 way.
    """
    check_env_id(id)
    options = dict(kwargs or {})  # env.kwargs alone, for the check of their values below
    kwargs = dict(options)
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    num_envs = int(num_envs)
    if options:  # before the env itself: an env may allow one instance at a time (a port, a device)
        _check_options(id, kwargs, options, seed)
    try:
        env = _make(id, kwargs, num_envs, vectorization_mode)
    except (gym.error.DependencyNotInstalled, ImportError) as err:
        raise _not_installed(id, err) from None
    except TypeError as err:
        raise _unknown_keyword(id, kwargs, err) or err
    env.action_space.seed(seed)
    # The other spaces seed themselves from the OS when first touched (a vector env touches them as it is built), and
    # a checkpoint pickles them: seeded, two runs of one config write the same bytes. Nothing samples them.
    spaces = [env.observation_space, getattr(env, "single_action_space", None),
              getattr(env, "single_observation_space", None)]  # fmt: skip
    for one in getattr(env, "envs", []):  # a sync vector env's own envs
        spaces += [one.action_space, one.observation_space]
    for space in filter(None, spaces):
        space.seed(seed)
    env_spec(env)  # refuse unsupported spaces now, not at the first sample
    return env


def _not_installed(id: str, err: Exception) -> ConfigError:
    # A plain ImportError too: gymnasium's moved envs (MuJoCo v2/v3, phys2d/..., tabular/...) raise one.
    return ConfigError("env.id", id, f"an env whose dependencies are installed: {str(err).rstrip('.')}")


def _unknown_keyword(id: str, kwargs: dict, err: TypeError) -> ConfigError | None:
    """gymnasium passes env.kwargs to the env's constructor: is `err` its refusal of one of them?"""
    if not any(f"keyword argument '{key}'" in str(err) for key in kwargs):
        return None
    return ConfigError("env.kwargs", kwargs, f"keyword arguments that {id}'s constructor accepts ({err})")


def _first_step(id: str, kwargs: dict, seed: int) -> None:
    env = gym.make(id, **kwargs)
    try:
        env.reset(seed=seed)
        env.action_space.seed(seed)
        env.step(env.action_space.sample())
    finally:
        env.close()


#: (id, env.kwargs) already taken through a first step in this process: the run's held-out env has the same options.
_CHECKED: set[tuple[str, str]] = set()


def _check_options(id: str, kwargs: dict, options: dict, seed: int) -> None:
    """A value of the wrong type in env.kwargs (g=abc for Pendulum) is taken by the constructor and fails only at the
    first step, deep in the env's code and after the run has started. One reset and one step of a throwaway env find
    it now; the failure is put down to env.kwargs only if the env without them takes the same step. The global random
    streams are left as they were, since an env may draw from them: a seeded run's numbers do not change. The CUDA
    ones only where CUDA is already up: reading them would start it in collect.py or evaluate.py, which never use it."""
    if (id, repr(kwargs)) in _CHECKED:
        return
    state = rng_state(cuda=torch.cuda.is_initialized())
    try:
        _first_step(id, kwargs, seed)
    except gym.error.DependencyNotInstalled:  # a package an option needs (render_mode=human: pygame): said as such
        raise
    except Exception as err:
        if isinstance(err, TypeError) and (unknown := _unknown_keyword(id, kwargs, err)):
            raise unknown from err
        try:
            _first_step(id, {k: v for k, v in kwargs.items() if k not in options}, seed)
        except Exception:
            if isinstance(err, ImportError):
                raise _not_installed(id, err) from None
            raise err from None  # the env fails without them too: its own problem, shown as it is
        raise ConfigError("env.kwargs", options, f"values {id} can run with: with them its first reset and step "
                          f"failed ({type(err).__name__}: {err}), without them they do") from err
    finally:
        set_rng_state(state)
    _CHECKED.add((id, repr(kwargs)))


def vectorization(id: str, vectorization_mode: str | None) -> str:
    """The vector mode make_env uses for `id` (env.vectorization_mode, null = automatic); refuses vector_entry_point
    for an env without a batched implementation of its own. It reads the registry only, so config checks can call
    it before any env is made."""
    has_own = gym.spec(id.split(":")[-1]).vector_entry_point is not None
    if vectorization_mode is None:
        return "vector_entry_point" if has_own else "sync"
    if vectorization_mode == "vector_entry_point" and not has_own:
        raise ConfigError("env.vectorization_mode", vectorization_mode, f"null, sync or async: {id} has no batched "
                          "implementation of its own (no vector_entry_point)")  # fmt: skip
    return vectorization_mode


def _make(id: str, kwargs: dict, num_envs: int, vectorization_mode: str | None) -> gym.Env | gym.vector.VectorEnv:
    if num_envs == 1:
        env = gym.make(id, **kwargs)
    else:
        vectorization_mode = vectorization(id, vectorization_mode)
        if vectorization_mode == "sync":
            # What make_vec builds for "sync", but from a partial, which pickles (make_vec's local closure does not):
            # a checkpoint then holds the envs' exact state, and a resumed run stays bit-identical.
            env = gym.vector.SyncVectorEnv([functools.partial(gym.make, id, **kwargs)] * num_envs)
            env.spec = env.envs[0].spec  # as make_vec does, so errors and checkpoints name the env, not the class
        else:
            vector_kwargs = {"worker": _async_worker} if vectorization_mode == "async" else None
            env = gym.make_vec(id, num_envs=num_envs, vectorization_mode=vectorization_mode,
                               vector_kwargs=vector_kwargs, **kwargs)  # fmt: skip
            if vector_kwargs:
                # Before multiprocessing's own exit hook (atexit runs the newest first), which would SIGTERM the
                # workers, now deaf to it, and wait for them for ever where the env is still open (a second Ctrl-C).
                atexit.register(_close_async, weakref.ref(env))
    return env


def _close_async(ref: weakref.ref) -> None:
    env = ref()
    if env is not None and not env.closed:
        env.close(terminate=True)  # closes the pipes: the workers end at their end-of-file


def _async_worker(*args, **kwargs) -> None:
    """gymnasium's worker of an async vector env, deaf to SIGINT and SIGTERM. Ctrl-C in a terminal and SLURM's
    preemption signal the whole process group, workers included: gymnasium's worker then dies (or reports a
    KeyboardInterrupt), the training process's next env step fails with a traceback, and the run ends without the
    checkpoint its stop promises (StopSignals). The training process alone acts on them. A worker ends when its pipe
    does, as the training process closes the env or ends however it ends (gymnasium's own terminate() is a SIGTERM,
    always followed by closing the pipes): quietly, since the reply it then tries to send has no reader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(BrokenPipeError, EOFError):
        gym.vector.async_vector_env._async_worker(*args, **kwargs)
