"""Checkpoints: everything needed to use a trained world model again (weights, normalizer, resolved config)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from worldmodel.errors import WorldModelError
from worldmodel.model import WorldModel


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where a run keeps its final checkpoint: <run dir>/checkpoints/last.pt."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def save_checkpoint(path: str | Path, model: WorldModel, cfg: DictConfig, metrics: dict, env_spec) -> None:
    """Atomic: written to a temporary file and renamed, so a crash mid-save never destroys an older checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),  # the normalizer's statistics are buffers inside it
        "config": OmegaConf.to_container(cfg, resolve=True),
        "env_spec": vars(env_spec),
        "metrics": metrics,
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_world_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[WorldModel, dict]:
    """Rebuilds the model from the checkpoint's own config, so no config needs to be passed alongside it."""
    path = Path(path)
    if not path.is_file():
        raise WorldModelError(f"Checkpoint {path} does not exist; a finished run writes <run dir>/checkpoints/last.pt.")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise WorldModelError(f"Checkpoint {path} is unreadable or truncated ({err}).") from None
    spec = payload["env_spec"]
    model = instantiate(payload["config"]["model"], obs_dim=spec["obs_dim"], action_dim=spec["action_dim"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), payload
