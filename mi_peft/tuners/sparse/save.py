"""All-or-nothing adapter saving: PEFT's ``save_pretrained`` writes files one by one in place."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def save_adapter(model: Any, save_directory: str | Path, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` that never leaves a half-written folder.

    Writes into a temporary sibling folder and renames it into place; an existing folder is
    replaced only after the new one is complete. On any error the target is left as it was.

    Example:
        >>> save_adapter(peft_model, "out/refusal-heads")
    """
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    old = target.parent / f".{target.name}.old"
    try:
        model.save_pretrained(str(tmp), **kwargs)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
