"""Register adapter types that PEFT does not know about.

PEFT's ``register_peft_method`` only accepts names that already exist in the ``PeftType`` enum,
so a third-party method must first add its member to that enum. This runs at import time of
``mi_peft``; every process that loads or trains one of our adapters (including each
``accelerate`` worker) must therefore ``import mi_peft`` first.

Registration also makes loading check ``adapter_model.safetensors`` before PEFT reads it: a file cut
short by an interrupted save otherwise fails deep inside ``PeftModel.from_pretrained`` with a bare
``SafetensorError: incomplete metadata`` that says neither which file nor what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft.utils import PeftType, register_peft_method

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class DamagedAdapterError(ValueError):
    """An adapter folder's ``adapter_model.safetensors`` is empty or truncated."""


def check_adapter_weights(adapter_dir: str | os.PathLike) -> None:
    """Raise :class:`DamagedAdapterError` when ``adapter_dir``'s weights file is damaged.

    A folder without the file (e.g. a Hub id) passes: PEFT reports that case clearly itself.

    Example:
        >>> check_adapter_weights("out/refusal-heads")  # before any loader that reads the weights
    """
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        return
    from ..checkpoints import _safetensors_problem  # lazy: checkpoints imports peft models

    problem = _safetensors_problem(path)
    if problem is not None:
        raise DamagedAdapterError(
            f"adapter weights {path} are damaged ({path.stat().st_size} bytes): {problem}; probably an interrupted "
            "save or download. Save the adapter again (`model.save_pretrained(folder)` or "
            "`mi_peft.save_adapter(model, folder)`), download it again, or load the last complete training "
            "checkpoint with `mi_peft.checkpoints.load_checkpoint(base_model, output_dir)`."
        )


def _check_weights_on_load(config_cls: type) -> None:
    """Make ``config_cls.from_pretrained`` (the first step of ``PeftModel.from_pretrained``) check the weights."""
    if getattr(config_cls.from_pretrained, "checks_adapter_weights", False):
        return
    load_config = config_cls.from_pretrained.__func__

    def from_pretrained(cls: type, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        folder = Path(str(pretrained_model_name_or_path), subfolder or "")
        check_adapter_weights(folder)
        return load_config(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    from_pretrained.checks_adapter_weights = True  # type: ignore[attr-defined]
    from_pretrained.__doc__ = load_config.__doc__
    config_cls.from_pretrained = classmethod(from_pretrained)


def extend_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) to ``PeftType`` if missing and return the member."""
    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, key, member)
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    return member


def register_method(*, name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Extend ``PeftType`` and register the method with PEFT (idempotent across re-imports)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = extend_peft_type(name)
    _check_weights_on_load(config_cls)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return peft_type
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        # a reloaded module defines new classes: replace the stale registration
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(peft_type, None)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type
