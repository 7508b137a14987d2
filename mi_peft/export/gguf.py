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

:func:`to_gguf_lora` writes a sparse (or PEFT LoRA) adapter as a llama.cpp LoRA GGUF directly, in the
layout llama.cpp's ``convert_lora_to_gguf.py`` produces (see that function). Both exports are checked
against llama.cpp itself in ``tests/test_llama_cpp.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from ..arch import ArchSpec, spec_for
from ..tuners._registry import check_adapter_weights
from ..tuners.sparse.config import ModuleSlices
from .lora import module_shape, read_sparse_adapter, sparse_lora_factors

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
    if config.get("head_stds"):
        raise ValueError(
            "the adapter steers attention heads (head_directions), which act inside the attention block; a llama.cpp "
            "control vector only adds to the residual stream. Export an adapter with only `op='add'`."
        )
    if op != "add":
        what = "a head/neuron-scale" if op is None else f"an `op={op!r}`"
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
    folder = Path(steering_dir)
    config, tensors = _read_adapter(folder)
    vectors = _vectors(folder, config, tensors)
    model_type = config.get("model_type") or "llama"

    def fill(writer) -> None:
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", LLAMA_CPP_ARCH.get(model_type, model_type))
        writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(vectors))
        for layer, vector in vectors.items():
            writer.add_tensor(f"direction.{layer}", vector.numpy().astype(np.float32))

    return write_gguf(out_file, CONTROL_VECTOR_ARCH, fill)


def write_gguf(out_file: str | os.PathLike, arch: str, fill: Callable[[Any], None]) -> Path:
    """Write a GGUF file all-or-nothing: ``fill(writer)`` adds metadata and tensors to a ``gguf.GGUFWriter``.

    The one GGUF file writer of mi-peft: it writes to a temporary name beside ``out_file`` and renames
    it, so a failure leaves no partial file (and any previous file untouched).
    """
    import gguf

    out = Path(out_file)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; pass a file path such as {out / 'adapter.gguf'}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        fill(writer)
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


# ---- llama.cpp LoRA -------------------------------------------------------------------------

# transformers model_type -> llama.cpp `general.architecture` of the converted base model.
LORA_ARCH: dict[str, str] = {"mistral": "llama", **LLAMA_CPP_ARCH}
LORA_MODEL_TYPES = (
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "llama",
    "mistral",
    "olmo2",
    "phi3",
    "qwen2",
    "qwen3",
)
# convert_hf_to_gguf.py permutes the q/k rows of these families (`LlamaModel.permute`, rotary layout).
_PERMUTED_QK = ("llama", "mistral")
_LORA_TENSORS = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def to_gguf_lora(
    model_or_adapter: str | os.PathLike | PeftModel,
    out_file: str | os.PathLike,
    base_model: nn.Module | None = None,
    ignore_fingerprint: bool = False,
) -> Path:
    """Write a sparse or PEFT LoRA adapter as a llama.cpp LoRA GGUF (``llama-cli -m base.gguf --lora out.gguf``).

    A llama.cpp LoRA file carries ONE ``adapter.lora.alpha`` and scales each module by ``alpha / rank``
    with the module's own rank, so per-module ranks/alphas (``to_lora``'s ``rank_pattern``/``alpha_pattern``)
    cannot be expressed as metadata: ``convert_lora_to_gguf.py`` reads only ``lora_alpha`` and applies
    every other module at the wrong scale. Here each module's PEFT scale and ``rank / alpha`` are folded
    into its ``lora_b``, so llama.cpp reproduces the adapter at ``--lora`` strength 1.

    Layout as ``convert_lora_to_gguf.py`` writes it: ``general.type = "adapter"``, ``adapter.type = "lora"``,
    ``adapter.lora.alpha``, ``general.architecture`` of the base GGUF, float32 tensors
    ``blk.{i}.{attn_q,...,ffn_down}.weight.lora_a`` ``[r, d_in]`` and ``.lora_b`` ``[d_out, r]`` (numpy
    order; ggml reads them transposed), with ``lora_b``'s rows reordered like the base weights
    (Llama/Mistral q/k rotary permutation, GPT-NeoX q/k/v de-interleaving).

    Args:
        model_or_adapter: a saved sparse or LoRA adapter folder, or a ``PeftModel`` (its active adapter).
        out_file: the ``.gguf`` file to write (atomically).
        base_model: the base model; needed for sparse ``scale``/``bias`` modes and for LoRA folders.
        ignore_fingerprint: skip the sparse adapter's base-model fingerprint check.
    """
    spec, pairs = _lora_pairs(model_or_adapter, base_model, ignore_fingerprint)
    if spec.model_type not in LORA_MODEL_TYPES:
        raise ValueError(
            f"no llama.cpp tensor layout is known for model_type {spec.model_type!r}; to_gguf_lora supports "
            f"{', '.join(LORA_MODEL_TYPES)}. Export with `to_lora` and convert with convert_lora_to_gguf.py instead."
        )
    if not pairs:
        raise ValueError("the adapter changes no module; there is nothing to export (check its heads/neurons).")
    alpha = float(max(a.shape[0] for a, _ in pairs.values()))
    tensors: dict[str, np.ndarray] = {}
    for module, (a, b) in sorted(pairs.items()):
        name, path = _gguf_weight_name(spec, module, a, b)
        b = _llama_cpp_rows(spec, path, b) * (a.shape[0] / alpha)  # llama.cpp multiplies by alpha / rank
        tensors[f"{name}.lora_a"] = a.float().contiguous().numpy()
        tensors[f"{name}.lora_b"] = b.float().contiguous().numpy()

    def fill(writer) -> None:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        for name, array in tensors.items():
            writer.add_tensor(name, array)

    return write_gguf(out_file, LORA_ARCH.get(spec.model_type, spec.model_type), fill)


def _lora_pairs(
    source: str | os.PathLike | PeftModel, base_model: nn.Module | None, ignore_fingerprint: bool
) -> tuple[ArchSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The architecture and ``{module: (A, B)}`` with every scale folded into ``B`` (effective scale 1)."""
    if isinstance(source, PeftModel):
        if base_model is not None:
            raise ValueError("`base_model=` is only for adapter folders; a PeftModel already holds its base model.")
        name = source.active_adapter
        config, weights = source.peft_config[name], get_peft_model_state_dict(source, adapter_name=name)
        base_model, ignore_fingerprint = source, True  # the adapter sits on this very model
    elif isinstance(source, (str, os.PathLike)):
        config, weights = _read_any_adapter(Path(source))
    else:
        raise TypeError(f"to_gguf_lora takes an adapter folder or a PeftModel, not {type(source).__name__}.")
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type == "SPARSE":
        if config.head_mode == "bias" and config.heads:
            raise ValueError(
                "head_mode='bias' adds an output bias, which a llama.cpp LoRA cannot carry; train with "
                "head_mode='out' or 'scale', or merge the adapter (`merge_and_unload()`) and convert the merged model."
            )
        spec, factors = sparse_lora_factors(config, weights, base_model, ignore_fingerprint)
        return spec, {module: (a, b) for module, (a, b, _) in factors.items()}
    if peft_type == "LORA":
        if base_model is None:
            raise ValueError("a LoRA folder records no architecture: pass `base_model=` (the model it was trained on).")
        return spec_for(base_model), _scaled_lora_pairs(config, weights)
    if peft_type == "STEERING":
        raise ValueError("a steering adapter is a llama.cpp control vector: use `to_gguf_control_vector` instead.")
    raise ValueError(
        f"to_gguf_lora exports sparse and LoRA adapters, not {peft_type!r} adapters; merge it into the base model "
        "(`merge_and_unload()`) and convert the merged model with convert_hf_to_gguf.py instead."
    )


def _read_any_adapter(folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    config_file = folder / "adapter_config.json"
    if not config_file.is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise ValueError(
            f"{folder} is not a saved adapter (needs adapter_config.json and adapter_model.safetensors); "
            "save one with `peft_model.save_pretrained(folder)`."
        )
    check_adapter_weights(folder)
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if peft_type == "SPARSE":
        return read_sparse_adapter(folder)
    if peft_type == "LORA":
        return LoraConfig.from_pretrained(str(folder)), load_file(str(folder / "adapter_model.safetensors"))
    return SimpleNamespace(peft_type=peft_type), {}


def _scaled_lora_pairs(
    config: LoraConfig, weights: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B * scale)}`` of a PEFT LoRA adapter, with its per-module ``alpha / r`` (or rsLoRA) scale."""
    unsupported = [k for k in ("use_dora", "lora_bias", "modules_to_save") if getattr(config, k, None)]
    if unsupported:
        raise ValueError(
            f"a llama.cpp LoRA has only A/B matrices; this adapter also uses {unsupported}. Merge it into the base "
            "model (`merge_and_unload()`) and convert the merged model with convert_hf_to_gguf.py instead."
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _LORA_TENSORS.match(key)
        if match is None:
            raise ValueError(
                f"adapter tensor {key!r} is not a LoRA A/B weight of a linear layer; llama.cpp LoRA cannot carry it. "
                "Export an adapter that targets only decoder-layer projections."
            )
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    pairs = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"the adapter weights hold only lora_{''.join(ab)} for {module}; the folder is incomplete. Save it again."
            )
        rank = ab["A"].shape[0]
        alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), module), config.lora_alpha)
        pairs[module] = (ab["A"], ab["B"] * (alpha / (math.sqrt(rank) if config.use_rslora else rank)))
    return pairs


def _gguf_weight_name(spec: ArchSpec, module: str, a: torch.Tensor, b: torch.Tensor) -> tuple[str, str]:
    """llama.cpp's name for the weight of ``module`` (``blk.3.attn_output.weight``) and its path in the layer.

    Also checks that ``B @ A`` has that weight's shape, so a wrong base model fails here, not in llama.cpp.
    """
    names = {spec.attn_out: "attn_output", spec.mlp_out: "ffn_down"}
    names.update(
        zip(spec.qkv, ("attn_q", "attn_k", "attn_v"), strict=True) if len(spec.qkv) == 3 else {spec.qkv[0]: "attn_qkv"}
    )
    names.update(
        zip(spec.mlp_in, ("ffn_gate", "ffn_up"), strict=True) if len(spec.mlp_in) == 2 else {spec.mlp_in[0]: "ffn_up"}
    )
    layer, _, path = module.removeprefix(f"{spec.layers}.").partition(".")
    if not module.startswith(f"{spec.layers}.") or not layer.isdigit() or path not in names:
        raise ValueError(
            f"module {module!r} is not a decoder-layer projection ({', '.join(sorted(names))}); llama.cpp LoRA "
            "export covers those only. Drop other target modules (embeddings, lm_head) from the adapter."
        )
    d_in, d_out = module_shape(spec, ModuleSlices(layer=int(layer), path=path))
    if int(layer) >= spec.n_layers or a.shape[1] != d_in or b.shape[0] != d_out:
        raise ValueError(
            f"{module}: the LoRA factors give a [{b.shape[0]}, {a.shape[1]}] delta, but {spec.model_type} layer {layer} "
            f"of {spec.n_layers} has a [{d_out}, {d_in}] weight there; pass the base model the adapter was trained on."
        )
    return f"blk.{int(layer)}.{names[path]}.weight", path


def _llama_cpp_rows(spec: ArchSpec, path: str, b: torch.Tensor) -> torch.Tensor:
    """``B`` with its output rows in the order convert_hf_to_gguf.py gives the base weight's rows."""
    if spec.model_type in _PERMUTED_QK and spec.qkv_layout == "separate" and path in spec.qkv[:2]:
        heads = spec.n_heads if path == spec.qkv[0] else spec.n_kv_heads
        return b.reshape(heads, 2, b.shape[0] // heads // 2, -1).transpose(1, 2).reshape(b.shape)
    if spec.qkv_layout == "interleaved" and path == spec.qkv[0]:
        return b.reshape(spec.n_heads, 3, spec.head_dim, -1).transpose(0, 1).reshape(b.shape)
    return b
