"""The model zoo. Every model implements models.base.WorldModel: `loss(batch)` and `imagine(...)`."""

from worldmodel.models.base import WorldModel
from worldmodel.models.ensemble import EnsembleWorldModel
from worldmodel.models.gru import GRUWorldModel
from worldmodel.models.rssm import RSSMWorldModel

__all__ = ["EnsembleWorldModel", "GRUWorldModel", "RSSMWorldModel", "WorldModel"]
