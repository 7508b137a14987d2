"""Find and load the last COMPLETE training checkpoint, so an interrupted run is never a lost run.

A run killed while the Trainer writes ``checkpoint-N`` leaves a folder that has some files, an
empty or truncated ``adapter_model.safetensors``, or no ``trainer_state.json`` yet. Transformers'
``get_last_checkpoint`` picks the newest folder by name only, so resuming from it fails or silently
starts from broken weights; here a checkpoint counts only when every file needed to load and resume
it is whole. The Trainer writes ``trainer_state.json`` last, so its presence means the step finished.
Importing this module imports ``mi_peft``, which registers the sparse and steering adapter types.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (empty, truncated header or data), or None when it is whole.

    Reads only the header: the 8-byte header length, the JSON header, and checks that the file is
    exactly as long as the tensors it declares, which is what a write cut short breaks.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated ({size} bytes, no header)"
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                return f"{path.name} is truncated (header of {header_len} bytes, file of {size})"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{path.name} has an unreadable header ({err})"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        return f"{path.name} has a malformed header"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name} is truncated ({size} bytes, its header describes {expected})"
    return None


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` is not a complete checkpoint folder, or None when it is.

    Complete means: ``adapter_config.json`` and ``trainer_state.json`` parse as JSON, and
    ``adapter_model.safetensors`` has a whole header and exactly the data that header describes.
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAINER_STATE):
        if not (folder / name).is_file():
            return f"{folder} has no {name}"
    for name in (ADAPTER_CONFIG, TRAINER_STATE):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as err:
            return f"{folder / name} does not parse ({err})"
    problem = _safetensors_problem(folder / ADAPTER_WEIGHTS)
    return None if problem is None else f"{folder}: {problem}"


def find_last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (by step N), or None.

    Incomplete folders, e.g. one the process was killed while writing, are skipped, so the
    answer is always safe to load or to resume from.

    Example:
        >>> find_last_checkpoint("runs/refusal-sft")
        PosixPath('runs/refusal-sft/checkpoint-40')
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    for _, folder in sorted(steps, reverse=True):
        if checkpoint_problem(folder) is None:
            return folder
    return None


def resolve_checkpoint(output_dir_or_checkpoint: str | os.PathLike) -> Path:
    """A checkpoint folder itself when complete, else the newest complete one inside it.

    Raises:
        FileNotFoundError: naming the folder and what to do, when there is no complete checkpoint
            (rather than PEFT's error about a missing adapter file, which hides the cause).
    """
    path = Path(output_dir_or_checkpoint)
    if _CHECKPOINT.match(path.name) and path.is_dir():
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        raise FileNotFoundError(
            f"checkpoint {path} is incomplete ({problem}); it was probably cut short by an interrupted "
            f"run. Pass its parent folder {path.parent} to use the newest complete checkpoint instead."
        )
    found = find_last_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"no complete checkpoint-N folder in {path} (each needs {ADAPTER_WEIGHTS}, {ADAPTER_CONFIG} and "
            f"{TRAINER_STATE}). Train with save_strategy='steps' and save_steps=N to write checkpoints; a finished "
            f"run's final adapter is the folder itself: load it with PeftModel.from_pretrained(base, {str(path)!r})."
        )
    return found


def load_checkpoint(
    base_model: PreTrainedModel,
    output_dir_or_checkpoint: str | os.PathLike,
    adapter_name: str = "default",
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained`` on the newest complete checkpoint (or the one given).

    ``output_dir_or_checkpoint`` is a training ``output_dir`` holding ``checkpoint-N`` folders or one
    such folder. ``kwargs`` go to ``PeftModel.from_pretrained`` (e.g. ``is_trainable=True``).
    ``base_model`` must be the model the run started from; its modules are wrapped in place.

    Example:
        >>> model = load_checkpoint(base, "runs/refusal-sft")  # survives a run killed mid-save
    """
    checkpoint = resolve_checkpoint(output_dir_or_checkpoint)
    return PeftModel.from_pretrained(base_model, str(checkpoint), adapter_name=adapter_name, **kwargs)
