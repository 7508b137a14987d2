"""The rule for ``target_modules`` of mi-peft's adapter configs: derived, never set by hand."""

from __future__ import annotations

from typing import Any

from ._registry import extend_peft_type


def set_peft_type_and_check_targets(config: Any, method: str, derived_from: str, instead: str) -> None:
    """Set ``config.peft_type`` to ``method``, first refusing a ``target_modules`` that a user set by hand.

    The value a saved ``adapter_config.json`` carries passes: PEFT writes ``peft_type`` into every saved
    config, while a user's call does not pass it. The module names are derived again from the other
    fields when the adapter is built, so a hand-set value would be silently replaced.
    """
    loaded = config.peft_type is not None
    if config.target_modules is not None and not loaded:
        raise ValueError(
            f"`target_modules` is derived from {derived_from}; do not set it (got {config.target_modules!r}). {instead}"
        )
    config.peft_type = extend_peft_type(method)
