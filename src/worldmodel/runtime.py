"""Seeding and device choice: the two things every entry point does before building anything."""

from __future__ import annotations

import random

import numpy as np
import torch

from worldmodel.errors import ConfigError

#: Held-out validation episodes come from an env seeded this far from the run's seed, so no sweep over nearby seeds
#: ever trains one run on another run's validation episodes.
VAL_SEED_OFFSET = 1_000_003


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    """`auto` means cuda when available, else cpu; asking for an accelerator that is not there is an error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("trainer.device", name, "one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", name, "auto or cpu: this machine has no CUDA device visible to torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("trainer.device", name, f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device", name, "auto or cpu: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError("trainer.device", name, "one of auto, cpu, cuda, cuda:N, mps")
    return device
