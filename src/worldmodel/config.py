"""validate_config: every value a run depends on is checked before the first env step or tensor allocation.

Hydra already refuses keys that are not in the config (a typo such as `trainer.stpes=5`); this checks the values.
"""

from __future__ import annotations

import math
from omegaconf import DictConfig

from worldmodel.env import check_env_id
from worldmodel.errors import ConfigError
from worldmodel.runtime import resolve_device


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
    _int(cfg, "buffer.capacity", max(seq_len, 1), f" (at least trainer.seq_len={seq_len}, so one sequence fits)")
    _int(cfg, "trainer.steps", 1)
    _int(cfg, "trainer.batch_size", 1)
    if cfg.buffer.get("dataset"):
        _int(cfg, "trainer.prefill", 0)
    else:
        _int(cfg, "trainer.prefill", seq_len, f" (at least trainer.seq_len={seq_len}, so the first update can sample)")
    _int(cfg, "trainer.env_steps_per_update", 0)
    _int(cfg, "trainer.val_steps", seq_len, f" (at least trainer.seq_len={seq_len}: one validation sequence)")
    _int(cfg, "trainer.eval_every", 1)
    _int(cfg, "trainer.log_every", 1)
    _int(cfg, "trainer.eval_context", 1)
    _int(cfg, "trainer.eval_horizon", 1)
    _int(cfg, "trainer.checkpoint_every", 1)
    _int(cfg, "trainer.keep_checkpoints", 1)
    if not isinstance(t.resume, bool):
        raise ConfigError("trainer.resume", t.resume, "true or false")
    _int(cfg, "model.latent_dim", 1)
    _int(cfg, "model.hidden_dim", 1)
    for key, value in (("trainer.lr", t.lr), ("trainer.grad_clip", t.grad_clip)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(key, value, "a finite number > 0")
    resolve_device(t.device)
    check_env_id(cfg.env.id)

