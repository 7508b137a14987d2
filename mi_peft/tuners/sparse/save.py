"""All-or-nothing adapter saving: PEFT's ``save_pretrained`` writes files one by one in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..._io import write_folder_atomically


def save_adapter(model: Any, save_directory: str | Path, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` that never leaves a half-written folder.

    Follows :func:`mi_peft._io.write_folder_atomically`: the files are written into a temporary
    sibling folder that then replaces ``save_directory`` (a previous adapter save there is replaced;
    a folder holding other files is refused). On any error the target is left as it was.

    Example:
        >>> save_adapter(peft_model, "out/refusal-heads")
    """
    return write_folder_atomically(save_directory, lambda tmp: model.save_pretrained(str(tmp), **kwargs))
