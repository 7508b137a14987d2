"""Zero-training steering adapter: add, project out or clamp a direction; scale heads and neurons; steer heads (ITI).

Registered with PEFT as ``"steering"`` (parameter prefix ``steer_``) when this package is imported.
"""

from .._registry import register_method
from .condition import CalibrationReport, SteeringCondition, calibrate_condition
from .config import SteeringConfig
from .heads import HeadDirections, head_directions
from .layer import SteeringEmbedding, SteeringLayer
from .model import SteeringModel
from .state import SteeringState

__all__ = [
    "CalibrationReport",
    "HeadDirections",
    "SteeringCondition",
    "SteeringConfig",
    "SteeringEmbedding",
    "SteeringLayer",
    "SteeringModel",
    "SteeringState",
    "calibrate_condition",
    "head_directions",
]

register_method(name="steering", config_cls=SteeringConfig, model_cls=SteeringModel, prefix="steer_")
