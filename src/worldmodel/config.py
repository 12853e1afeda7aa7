"""validate_config: every value a run depends on is checked before the first env step or tensor allocation.

Hydra already refuses keys that are not in the config (a typo such as `trainer.stpes=5`); this checks the values.
"""

from __future__ import annotations

import math
from omegaconf import DictConfig

from worldmodel.env import VECTORIZATION_MODES, check_env_id
from worldmodel.errors import ConfigError
from worldmodel.replay import obs_storage_dtype
from worldmodel.runtime import resolve_device
from worldmodel.trainer import PRECISIONS

#: torch.compile's modes; the last two record CUDA graphs of the compiled loss.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
GRAPHED_COMPILE_MODES = COMPILE_MODES[2:]


def _int(cfg: DictConfig, key: str, minimum: int, why: str = "") -> int:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}{why}")
    return value


def validate_config(cfg: DictConfig) -> None:
    t = cfg.trainer
    _int(cfg, "seed", 0)
    seq_len = _int(cfg, "trainer.seq_len", 1)
    envs = _int(cfg, "env.num_envs", 1) if "num_envs" in cfg.env else 1
    _int(cfg, "buffer.capacity", envs * seq_len, f" (env.num_envs={envs} streams x trainer.seq_len={seq_len}: each "
         "env's stream must hold one sequence)")  # fmt: skip
    mode = cfg.env.get("vectorization_mode")
    if mode is not None and mode not in VECTORIZATION_MODES:
        raise ConfigError("env.vectorization_mode", mode, f"null (automatic) or one of {', '.join(VECTORIZATION_MODES)}")
    resolve_device(cfg.buffer.get("device", "auto"), key="buffer.device")
    obs_storage_dtype(cfg.buffer.get("obs_dtype", "float32"))
    _int(cfg, "trainer.steps", 1)
    _int(cfg, "trainer.batch_size", 1)
    if cfg.buffer.get("dataset"):
        _int(cfg, "trainer.prefill", 0)
    else:
        _int(cfg, "trainer.prefill", envs * seq_len, f" (at least env.num_envs={envs} x trainer.seq_len={seq_len}, so "
             "the first update can sample)")  # fmt: skip
    _int(cfg, "trainer.env_steps_per_update", 0)
    _int(cfg, "trainer.val_steps", seq_len, f" (at least trainer.seq_len={seq_len}: one validation sequence)")
    _int(cfg, "trainer.eval_every", 1)
    _int(cfg, "trainer.log_every", 1)
    _int(cfg, "trainer.eval_context", 1)
    _int(cfg, "trainer.eval_horizon", 1)
    _int(cfg, "trainer.checkpoint_every", 1)
    _int(cfg, "trainer.keep_checkpoints", 1)
    for key in ("resume", "compile", "cuda_graph"):
        if not isinstance(t.get(key, False), bool):
            raise ConfigError(f"trainer.{key}", t[key], "true or false")
    if t.get("precision", "fp32") not in PRECISIONS:
        raise ConfigError("trainer.precision", t.precision, f"one of {', '.join(PRECISIONS)}")
    mode = t.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise ConfigError("trainer.compile_mode", mode, f"one of {', '.join(COMPILE_MODES)}")
    _int(cfg, "model.latent_dim", 1)
    _int(cfg, "model.hidden_dim", 1)
    if "head_layers" in cfg.model:
        _int(cfg, "model.head_layers", 1)
    for key, value in (("trainer.lr", t.lr), ("trainer.grad_clip", t.grad_clip)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(key, value, "a finite number > 0")
    device = resolve_device(t.device)
    if t.get("cuda_graph", False):
        if t.compile and mode in GRAPHED_COMPILE_MODES:
            raise ConfigError("trainer.compile_mode", mode, "default or max-autotune-no-cudagraphs with "
                              "trainer.cuda_graph=true, which records the whole update itself (the other modes record "
                              "CUDA graphs of their own inside it)")  # fmt: skip
        if device.type != "cuda":
            raise ConfigError("trainer.cuda_graph", True, f"false here: trainer.device={t.device} resolved to "
                              f"{device}, and CUDA graphs need a CUDA device")  # fmt: skip
    check_env_id(cfg.env.id)

