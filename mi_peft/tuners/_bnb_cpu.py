"""Keep bitsandbytes 4-bit weights in their trainable layout on CPUs with AVX-512-BF16.

On such CPUs, bitsandbytes' ``Linear4bit.forward`` repacks its weight into a CPU-only layout the
first time it runs in eval mode without gradients, and from then on computes with ``gemv_4bit``,
an op without an autograd kernel. A sparse adapter trains *through* the frozen 4-bit projections
above its lowest selected layer, so after any evaluation pass the gradients would silently be
wrong on those CPUs and right on others. Attaching a sparse adapter therefore restores the
standard layout and turns the inference-only repacking off, so every CPU class computes the same.
"""

from __future__ import annotations

from torch import nn


def keep_4bit_layout_trainable(model: nn.Module) -> int:
    """Undo and disable bitsandbytes' CPU-only weight repacking; returns how many layers were repacked."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layer can exist
        return 0
    restored = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            # the inverse bitsandbytes applies before saving a state dict or moving to a GPU ...
            weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            if not state.nested and state.absmax.dim() == 2:
                # ... leaves a non-nested absmax transposed ([K / blocksize, N], bfloat16): restore the
                # flat float32 layout. Packing rounded it to bfloat16, which no inverse can undo.
                state.absmax = state.absmax.T.reshape(-1).float().contiguous()
            weight.quant_state = state
            restored += 1
        module.support_avx512bf16_for_cpu = False
    return restored
