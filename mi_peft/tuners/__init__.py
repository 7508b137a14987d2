"""mi-peft's PEFT adapter types; importing this package registers them with PEFT."""

from . import sparse, steering
from .sparse import SparseConfig, SparseModel, save_adapter
from .steering import SteeringConfig

__all__ = ["SparseConfig", "SparseModel", "SteeringConfig", "save_adapter", "sparse", "steering"]
