"""Sparse tuner layer: trainable deltas on selected input columns / output rows of one projection.

The frozen base layer is only ever called, never read, in the forward pass, so the same code runs
on ``nn.Linear``, GPT-2 ``Conv1D`` and quantized bases such as bitsandbytes ``Linear4bit``.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .config import ModuleSlices
from .gate import SparseGate, on_rows

INIT_STD = 0.02  # std of the random deltas drawn with `init_weights=False`


class SparseLayer(BaseTunerLayer):
    """State of a sparse adapter on one projection; parameters hold only the selected slices.

    Per adapter name: ``sparse_delta`` ``[d_out, n_cols]`` (added as ``x[..., cols] @ D^T``),
    ``sparse_scale`` ``[n_cols // group]`` (offset from 1 of a per-head/neuron input scale),
    ``sparse_bias`` ``[n_cols]`` (added to the selected inputs), ``sparse_row_delta``
    ``[n_rows, d_in]`` (added to the selected outputs as ``x @ R^T``).
    """

    adapter_layer_names = ("sparse_delta", "sparse_scale", "sparse_bias", "sparse_row_delta")
    other_param_names = ("sparse_slices", "sparse_index", "sparse_merge_cache")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.sparse_delta = nn.ParameterDict({})
        self.sparse_scale = nn.ParameterDict({})
        self.sparse_bias = nn.ParameterDict({})
        self.sparse_row_delta = nn.ParameterDict({})
        self.sparse_slices: dict[str, ModuleSlices] = {}
        # index tensors (cols, rows) per adapter; rebuilt from the config, never saved
        self.sparse_index: dict[str, tuple[Tensor, Tensor]] = {}
        # what a scale/bias merge added (it depends on the base weight), so unmerge subtracts the same
        self.sparse_merge_cache: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        self._sparse_created_bias = False
        # shared with the other layers of the model: the sequences each conditional adapter applies to
        self.sparse_gate: SparseGate | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.quantization_backend = resolve_quantization_backend(base)
        self.in_features, self.out_features = _get_in_out_features(base)
        if self.in_features is None:
            raise TypeError(f"sparse adapters need a linear base layer, got {type(base).__name__}.")
        self.is_conv1d = isinstance(base, Conv1D)  # weight stored [in, out]
        self.kwargs = kwargs

    def update_layer(
        self, adapter_name: str, slices: ModuleSlices, init_weights: bool = True, inference_mode: bool = False
    ) -> None:
        """Create the slice parameters of ``adapter_name`` (zero = identity unless ``init_weights=False``)."""
        cols = torch.tensor(slices.cols, dtype=torch.long)
        rows = torch.tensor(slices.rows, dtype=torch.long)
        for kind, idx, size in (("column", cols, self.in_features), ("row", rows, self.out_features)):
            if idx.numel() and (idx.min() < 0 or idx.max() >= size):
                raise ValueError(
                    f"adapter {adapter_name!r}: {kind} index {int(idx.max())} is out of range for "
                    f"{type(self.get_base_layer()).__name__} with {size} {kind}s."
                )
        if slices.cols and len(slices.cols) % slices.group:
            raise ValueError(f"{len(slices.cols)} columns cannot form groups of {slices.group}.")

        def new(*shape: int) -> nn.Parameter:
            value = torch.zeros(shape) if init_weights else torch.randn(shape) * INIT_STD
            return nn.Parameter(value)

        if slices.cols:
            if slices.col_mode == "delta":
                self.sparse_delta[adapter_name] = new(self.out_features, len(cols))
            elif slices.col_mode == "scale":
                self.sparse_scale[adapter_name] = new(len(cols) // slices.group)
            elif slices.col_mode == "bias":
                self.sparse_bias[adapter_name] = new(len(cols))
            else:
                raise ValueError(f"unknown column mode {slices.col_mode!r}; expected 'delta', 'scale' or 'bias'.")
        if slices.rows:
            self.sparse_row_delta[adapter_name] = new(len(rows), self.in_features)
        self.sparse_slices[adapter_name] = slices
        self.sparse_index[adapter_name] = (cols, rows)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ---- helpers ---------------------------------------------------------------------------

    def _index(self, adapter: str, device: torch.device) -> tuple[Tensor, Tensor]:
        cols, rows = self.sparse_index[adapter]
        if cols.device != device:
            cols, rows = cols.to(device), rows.to(device)
            self.sparse_index[adapter] = (cols, rows)
        return cols, rows

    def _input_offset(self, adapter: str, x: Tensor) -> Tensor | None:
        """What a scale/bias adapter adds to the selected inputs ``x[..., cols]``, or ``None``."""
        if adapter in self.sparse_scale:
            scale = self.sparse_scale[adapter]
            cols, _ = self._index(adapter, x.device)
            per_col = scale.repeat_interleave(self.sparse_slices[adapter].group)
            return x.index_select(-1, cols).to(scale.dtype) * per_col
        if adapter in self.sparse_bias:
            bias = self.sparse_bias[adapter]
            return bias.expand(*x.shape[:-1], bias.shape[0])
        return None

    def _base_columns(self, adapter: str) -> Tensor:
        """Base weight at the adapter's input columns, as ``[d_out, n_cols]`` (at least float32)."""
        weight = self.get_base_layer().weight.data
        cols, _ = self._index(adapter, weight.device)
        sliced = weight.index_select(0, cols).T if self.is_conv1d else weight.index_select(1, cols)
        return sliced.to(torch.promote_types(weight.dtype, torch.float32))

    # ---- forward ---------------------------------------------------------------------------

    def _sparse_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        gate = self.sparse_gate
        if self.merged or (gate is not None and gate.deciding):
            return self.base_layer(x, *args, **kwargs)
        active = []
        for adapter in (a for a in self.active_adapters if a in self.sparse_slices):
            rows, skip = (None, False) if gate is None else gate.rows_for(adapter, x.shape[0])
            if not skip:
                active.append((adapter, rows))
        x_base = x
        for adapter, rows in active:  # scale/bias act on the projection input: z_h -> (1 + s) z_h + b
            offset = self._input_offset(adapter, x)
            if offset is not None:
                cols, _ = self._index(adapter, x.device)
                x_base = x_base.index_add(-1, cols, on_rows(offset.to(x.dtype), rows))
        result = self.base_layer(x_base, *args, **kwargs)
        for adapter, rows in active:
            cols, rows_out = self._index(adapter, x.device)
            if adapter in self.sparse_delta:
                delta = self.sparse_delta[adapter]
                update = x.index_select(-1, cols).to(delta.dtype) @ delta.T
                result = result + on_rows(update.to(result.dtype), rows)
            if adapter in self.sparse_row_delta:
                delta = self.sparse_row_delta[adapter]
                update = x.to(delta.dtype) @ delta.T
                result = result.index_add(-1, rows_out, on_rows(update.to(result.dtype), rows))
        return result

    # ---- merge / unmerge -------------------------------------------------------------------

    def _increments(self, adapter: str) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(column increment [d_out, n_cols], row increment [n_rows, d_in], bias increment [d_out])."""
        col = self.sparse_delta.get(adapter, None)
        row = self.sparse_row_delta.get(adapter, None)
        bias = None
        if adapter in self.sparse_merge_cache:
            col_cached, bias = self.sparse_merge_cache[adapter]
            col = col_cached if col_cached is not None else col
        elif adapter in self.sparse_scale:
            base_cols = self._base_columns(adapter)
            per_col = self.sparse_scale[adapter].repeat_interleave(self.sparse_slices[adapter].group)
            col = base_cols * per_col.to(base_cols.dtype)
        elif adapter in self.sparse_bias:
            base_cols = self._base_columns(adapter)
            bias = base_cols @ self.sparse_bias[adapter].to(base_cols.dtype)
        return col, row, bias

    def _add_increments(
        self,
        adapter: str,
        weight: Tensor,
        bias: Tensor | None,
        sign: float,
        increments: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
    ) -> None:
        cols, rows = self._index(adapter, weight.device)
        col, row, bias_inc = self._increments(adapter) if increments is None else increments
        if col is not None:
            col = col.detach().to(weight.dtype)
            if self.is_conv1d:
                weight.index_add_(0, cols, col.T, alpha=sign)
            else:
                weight.index_add_(1, cols, col, alpha=sign)
        if row is not None:
            row = row.detach().to(weight.dtype)
            if self.is_conv1d:
                weight.index_add_(1, rows, row.T, alpha=sign)
            else:
                weight.index_add_(0, rows, row, alpha=sign)
        if bias_inc is not None:
            bias.add_(bias_inc.detach().to(bias.dtype), alpha=sign)

    def _check_mergeable(self, adapter: str, merged: list[str]) -> None:
        if self.quantization_backend is not None:
            raise ValueError(
                f"cannot merge sparse adapter {adapter!r} into a quantized ({self.quantization_backend.backend_name}) "
                "base layer: re-quantizing would lose exactness and unmerge could not restore the base. Load the base "
                "model unquantized, `PeftModel.from_pretrained(base, adapter_dir)`, then `merge_and_unload()`."
            )
        if adapter not in self.sparse_scale and adapter not in self.sparse_bias:
            return
        cols, _ = self.sparse_index[adapter]
        for other in merged:  # scale/bias read the base weight at `cols`: nothing merged may have changed it
            other_cols, other_rows = self.sparse_index[other]
            changes_cols = other in self.sparse_delta or other in self.sparse_scale
            if other_rows.numel() or (changes_cols and torch.isin(cols, other_cols).any()):
                raise ValueError(
                    f"cannot merge sparse adapter {adapter!r} ({self.sparse_slices[adapter].col_mode} mode) together "
                    f"with adapter {other!r}: it is defined on the base weights that {other!r} changes. Merge them "
                    "one at a time in the other order, or `unmerge_adapter()` first."
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' slice deltas into the base weights, exactly.

        All or nothing: the new weight and bias are computed on copies and swapped in only when every
        adapter succeeded (and, with ``safe_merge``, the result is finite).
        """
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.sparse_slices]
        for i, adapter in enumerate(adapter_names):  # check all first: merge all or nothing in this layer
            self._check_mergeable(adapter, self.merged_adapters + adapter_names[:i])
        if not adapter_names:
            return
        base = self.get_base_layer()
        weight = base.weight.data.clone()
        bias = None if base.bias is None else base.bias.data.clone()
        create_bias = bias is None and any(a in self.sparse_bias for a in adapter_names)
        if create_bias:
            bias = torch.zeros(self.out_features, dtype=weight.dtype, device=weight.device)
        caches = {}
        for adapter in adapter_names:  # scale/bias increments read base columns no other adapter here changes
            increments = self._increments(adapter)
            if adapter in self.sparse_scale or adapter in self.sparse_bias:
                caches[adapter] = (increments[0], increments[2])
            self._add_increments(adapter, weight, bias, 1.0, increments)
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapters {adapter_names} seem to be broken")
        base.weight.data = weight
        if create_bias:
            base.bias = nn.Parameter(bias, requires_grad=False)
            self._sparse_created_bias = True
        elif bias is not None:
            base.bias.data = bias
        self.sparse_merge_cache.update(caches)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Subtract the merged slice deltas again (the same values that merge added)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.sparse_slices:
                continue
            self._add_increments(adapter, base.weight.data, None if base.bias is None else base.bias.data, sign=-1.0)
            self.sparse_merge_cache.pop(adapter, None)
        if self._sparse_created_bias:
            base.bias = None
            self._sparse_created_bias = False


class SparseLinear(nn.Module, SparseLayer):
    """Sparse adapter around a linear projection (``nn.Linear``, ``Conv1D`` or a quantized linear)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, slices: ModuleSlices, init_weights: bool = True, **kwargs
    ) -> None:
        super().__init__()
        SparseLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, slices, init_weights=init_weights)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._sparse_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()
