"""Export an additive steering adapter as a llama.cpp control vector (GGUF), and read one back.

Format (what llama.cpp's ``cvector-generator`` writes and ``common_control_vector_load`` reads,
and what repeng's ``ControlVector.export_gguf`` writes): ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the llama.cpp architecture name, e.g. ``"llama"``),
``controlvector.layer_count`` (number of direction tensors) and one float32 tensor
``direction.<N>`` of length ``d_model`` per steered layer.

Layer numbering: llama.cpp adds ``direction.N`` to the output of decoder layer ``N`` counted from
0 (its ``l_out-N``: ``apply_to(cur, il)`` runs after layer ``il`` and reads the tensor stored for
``direction.il``). That is exactly where this library's ``add`` at layer ``N`` acts (the residual
stream after ``model.layers[N]``), so layer ``N`` is written as ``direction.N``, as repeng does
with its own 0-based layer ids. llama.cpp has no slot for the output of layer 0 (a file with
``direction.0`` is rejected), so steering of layer 0 cannot be exported.

Use it with ``llama-cli -m model.gguf --control-vector steer.gguf`` (strength 1 reproduces the
adapter; ``--control-vector-scaled steer.gguf 0.5`` halves it).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..tuners._registry import check_adapter_weights

CONTROL_VECTOR_ARCH = "controlvector"
# transformers model_type -> llama.cpp architecture name, where the two differ.
LLAMA_CPP_ARCH: dict[str, str] = {"gpt_neox": "gptneox", "gemma3_text": "gemma3"}
_DIRECTION_KEY = re.compile(r"\.(\d+)\.steer_direction$")


def _read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(
            f"{folder} is not a saved steering adapter (needs adapter_config.json and adapter_model.safetensors); "
            "save one with `peft_model.save_pretrained(folder)`."
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "STEERING":
        raise ValueError(f"{folder} holds a {config.get('peft_type')!r} adapter, not a steering adapter.")
    check_adapter_weights(folder)
    return config, load_file(str(weights_file))


def control_vectors(steering_dir: str | os.PathLike) -> dict[int, torch.Tensor]:
    """The per-layer vectors ``alpha * direction`` an additive steering adapter adds, keyed by layer."""
    folder = Path(steering_dir)
    return _vectors(folder, *_read_adapter(folder))


def _vectors(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    op = config.get("op")
    if op != "add":
        what = "a scale-only" if op is None else f"an `op={op!r}`"
        raise ValueError(
            f"{what} steering adapter cannot be exported as a control vector: llama.cpp control vectors only add "
            "a fixed vector per layer. Merge ablation and head/neuron scales into the weights with "
            "`merge_and_unload()` and convert the merged model instead."
        )
    if config.get("head_scales") or config.get("neuron_scales"):
        raise ValueError(
            "the adapter also scales heads/neurons, which a control vector cannot express; export an "
            "adapter with only `op='add'`."
        )
    if config.get("positions", "all") != "all" or config.get("condition") is not None:
        raise ValueError(
            "llama.cpp applies control vectors to every token of every prompt; an adapter with positions="
            f"{config.get('positions')!r} or a condition cannot be exported faithfully."
        )
    found = {int(m.group(1)): t for key, t in tensors.items() if (m := _DIRECTION_KEY.search(key))}
    layers = [int(layer) for layer in config.get("layers") or []]
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise ValueError(f"{folder} has no saved direction for layers {missing}; the adapter folder is incomplete.")
    if 0 in layers:
        raise ValueError(
            "llama.cpp cannot steer the output of layer 0 (it rejects `direction.0`); drop layer 0 from `layers`."
        )
    alpha = config.get("alpha", 1.0)
    return {
        layer: found[layer].float() * float(alpha[str(layer)] if isinstance(alpha, dict) else alpha)
        for layer in sorted(layers)
    }


def to_gguf_control_vector(steering_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write the additive steering adapter saved in ``steering_dir`` as a llama.cpp control vector.

    Each steered layer ``N`` becomes ``direction.N = alpha_N * unit_direction_N`` (float32); the file
    is written to a temporary name and renamed, so a failure leaves no partial file.

    Raises:
        ValueError: for ablation, clamp, scale-only, position-limited or conditional adapters (a
            control vector only adds one vector per layer to every token), or a steered layer 0.
    """
    import gguf

    folder = Path(steering_dir)
    config, tensors = _read_adapter(folder)
    vectors = _vectors(folder, config, tensors)
    model_type = config.get("model_type") or "llama"
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", LLAMA_CPP_ARCH.get(model_type, model_type))
        writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(vectors))
        for layer, vector in vectors.items():
            writer.add_tensor(f"direction.{layer}", vector.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def from_gguf_control_vector(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """Read a control-vector GGUF (ours, llama.cpp's or repeng's) as ``{layer: vector}`` (llama.cpp numbering)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != CONTROL_VECTOR_ARCH:
        found = None if arch is None else arch.contents()
        raise ValueError(f"{path} is not a control vector: general.architecture is {found!r}, not 'controlvector'.")
    vectors = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction."):
            continue
        suffix = tensor.name.split(".", 1)[1]
        if not suffix.isdigit():
            raise ValueError(f"{path} has a malformed tensor name {tensor.name!r}; expected 'direction.<layer>'.")
        vectors[int(suffix)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
    if not vectors:
        raise ValueError(f"{path} holds no 'direction.<layer>' tensors.")
    return dict(sorted(vectors.items()))
