"""The model zoo. Every model implements models.base.WorldModel: `loss(batch)` and `imagine(...)`."""

from worldmodel.models.base import WorldModel
from worldmodel.models.gru import GRUWorldModel

__all__ = ["GRUWorldModel", "WorldModel"]
