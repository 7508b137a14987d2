"""Register adapter types that PEFT does not know about.

PEFT's ``register_peft_method`` only accepts names that already exist in the ``PeftType`` enum,
so a third-party method must first add its member to that enum. This runs at import time of
``mi_peft``; every process that loads or trains one of our adapters (including each
``accelerate`` worker) must therefore ``import mi_peft`` first.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


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
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return peft_type
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        # a reloaded module defines new classes: replace the stale registration
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(peft_type, None)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type
