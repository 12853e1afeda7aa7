"""worldmodel: learn the dynamics of gymnasium environments.

Pipeline: make_env -> rollout (Collector) -> RingBuffer -> ReplayBuffer -> WorldModel -> Trainer -> TensorBoard.
"""

from worldmodel.env import EnvSpec, env_spec, make_env
from worldmodel.errors import ConfigError, NotEnoughDataError, WorldModelError
from worldmodel.models import GRUWorldModel, WorldModel
from worldmodel.replay import Batch, ReplayBuffer
from worldmodel.ring import RingBuffer
from worldmodel.rollout import Collector, RandomPolicy

__all__ = [
    "Batch",
    "Collector",
    "ConfigError",
    "EnvSpec",
    "GRUWorldModel",
    "NotEnoughDataError",
    "RandomPolicy",
    "ReplayBuffer",
    "RingBuffer",
    "WorldModel",
    "WorldModelError",
    "env_spec",
    "make_env",
]
