"""Sparse "located components" adapter: train only selected heads and neurons (PEFT method ``"sparse"``).

Importing this package registers the method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and TRL's ``peft_config=`` accept a :class:`SparseConfig`.
"""

from .._registry import register_method
from .config import ModuleSlices, SparseConfig
from .layer import SparseLayer, SparseLinear
from .model import SparseModel
from .save import save_adapter

__all__ = ["ModuleSlices", "SparseConfig", "SparseLayer", "SparseLinear", "SparseModel", "save_adapter"]

register_method(name="sparse", config_cls=SparseConfig, model_cls=SparseModel, prefix="sparse_")
