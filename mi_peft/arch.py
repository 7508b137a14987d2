"""Architecture map: where heads, neurons and the residual stream live in each model family.

Every other module asks an :class:`ArchSpec` for module paths and sizes instead of guessing
from class or parameter names. Users add a family with :func:`register`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

QkvLayout = Literal["separate", "concat", "interleaved"]
"""How q/k/v rows are stored: three modules, one fused ``[q|k|v]`` module, or GPT-NeoX's
per-head interleaving ``[head0: q k v, head1: q k v, ...]``."""

GateUpLayout = Literal["separate", "concat"]


@dataclass(frozen=True)
class BiasSwitch:
    """A config flag that makes transformers build some projections of every layer with a bias.

    A merge that adds a bias to a bias-free projection must set ``flag`` and give every projection
    in ``modules`` (paths in a decoder layer) a bias, or the saved model reloads without it.
    """

    flag: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Where the interpretable parts of one model family live.

    Module paths are dotted attribute paths. ``layers`` is relative to the model (the
    ``*ForCausalLM``); the projection paths are relative to one decoder layer.

    Args:
        model_type (`str`): ``config.model_type`` this spec is registered for.
        layers (`str`): path of the ``ModuleList`` of decoder layers.
        attn_out (`str`): attention output projection. Its input is the concatenation of the
            per-head outputs ``hook_z`` ``[batch, pos, n_heads * d_head]``.
        mlp_out (`str`): MLP output projection. Its input features are the neurons
            ``hook_post`` ``[batch, pos, d_mlp]``.
        qkv (`tuple[str, ...]`): q, k, v projections (three paths) or one fused path.
        qkv_layout (`QkvLayout`): row layout of ``qkv``.
        mlp_in (`tuple[str, ...]`): projections producing the neurons (gate and up, or one).
        mlp_in_layout (`GateUpLayout`): ``"concat"`` when gate and up are one fused module.
        final_norm (`str`): final norm applied before the unembedding (path from the model).
        unembed (`str | None`): unembedding module path; ``None`` uses ``get_output_embeddings()``.
        conv1d (`bool`): GPT-2 style ``Conv1D`` weights stored ``[in, out]`` instead of ``[out, in]``.
        attn_out_bias, mlp_out_bias (`BiasSwitch | None`): the config flag that gives the attention / MLP
            output projection a bias, or ``None`` when the family has none (a merge that needs one refuses).
        n_layers_attr, n_heads_attr, n_kv_heads_attr, d_model_attr, d_mlp_attr: config attribute
            names (first present wins).
    """

    model_type: str
    layers: str
    attn_out: str
    mlp_out: str
    qkv: tuple[str, ...]
    mlp_in: tuple[str, ...]
    final_norm: str
    unembed: str | None = None
    qkv_layout: QkvLayout = "separate"
    mlp_in_layout: GateUpLayout = "separate"
    conv1d: bool = False
    attn_out_bias: BiasSwitch | None = None
    mlp_out_bias: BiasSwitch | None = None
    n_layers_attr: tuple[str, ...] = ("num_hidden_layers", "n_layer")
    n_heads_attr: tuple[str, ...] = ("num_attention_heads", "n_head")
    n_kv_heads_attr: tuple[str, ...] = ("num_key_value_heads",)
    d_model_attr: tuple[str, ...] = ("hidden_size", "n_embd")
    d_mlp_attr: tuple[str, ...] = ("intermediate_size", "n_inner")
    # Filled in by `spec_for` from a concrete config.
    n_layers: int = field(default=0)
    n_heads: int = field(default=0)
    n_kv_heads: int = field(default=0)
    head_dim: int = field(default=0)
    d_model: int = field(default=0)
    n_neurons: int = field(default=0)

    def __post_init__(self) -> None:
        for name in ("attn_out_bias", "mlp_out_bias"):  # rebuilt from JSON (a saved LocalizationResult)
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, BiasSwitch(value["flag"], tuple(value["modules"])))

    @property
    def d_head(self) -> int:
        """TransformerLens name for :attr:`head_dim`."""
        return self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads sharing one key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def bind(self, config: Any) -> ArchSpec:
        """Return a copy with the sizes read from ``config``."""
        text = getattr(config, "text_config", None)
        if text is not None and not hasattr(config, "num_hidden_layers"):
            config = text
        n_layers = _first_attr(config, self.n_layers_attr)
        n_heads = _first_attr(config, self.n_heads_attr)
        n_kv = _first_attr(config, self.n_kv_heads_attr, default=None) or n_heads
        d_model = _first_attr(config, self.d_model_attr)
        head_dim = getattr(config, "head_dim", None) or d_model // n_heads
        d_mlp = _first_attr(config, self.d_mlp_attr, default=None) or 4 * d_model
        return dataclasses.replace(
            self,
            n_layers=int(n_layers),
            n_heads=int(n_heads),
            n_kv_heads=int(n_kv),
            head_dim=int(head_dim),
            d_model=int(d_model),
            n_neurons=int(d_mlp),
        )

    # ---- module access -------------------------------------------------------------------

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(_unwrap(model), self.layers)

    def layer_module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        self.check_layer(layer)
        return _get(self.decoder_layers(model)[layer], path)

    def attn_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.layer_module(model, layer, self.attn_out)

    def mlp_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.layer_module(model, layer, self.mlp_out)

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return _get(_unwrap(model), self.final_norm)

    def unembed_module(self, model: nn.Module) -> nn.Module:
        base = _unwrap(model)
        return base.get_output_embeddings() if self.unembed is None else _get(base, self.unembed)

    def bias_switch(self, path: str) -> BiasSwitch | None:
        """The :class:`BiasSwitch` that gives the projection at ``path`` (in a decoder layer) a bias."""
        for switch in (self.attn_out_bias, self.mlp_out_bias):
            if switch is not None and path in switch.modules:
                return switch
        return None

    # ---- row layouts for q/k/v and gate/up -----------------------------------------------

    def head_qkv_rows(self, head: int) -> dict[str, torch.Tensor]:
        """Output rows of the q/k/v projection(s) that head ``head`` reads.

        With grouped-query attention the k/v rows belong to the key/value head
        ``head // group_size`` and are shared with the other query heads of that group.
        """
        self.check_head(head)
        d, kv = self.head_dim, head // self.group_size
        q = torch.arange(head * d, (head + 1) * d)
        k = torch.arange(kv * d, (kv + 1) * d)
        if self.qkv_layout == "separate":
            q_path, k_path, v_path = self.qkv
            return {q_path: q, k_path: k, v_path: k.clone()}
        (path,) = self.qkv
        if self.qkv_layout == "concat":
            q_width, kv_width = self.n_heads * d, self.n_kv_heads * d
            rows = torch.cat([q, q_width + k, q_width + kv_width + k])
            return {path: rows}
        # interleaved (GPT-NeoX): [head, (q|k|v), d_head]
        base = head * 3 * d
        return {path: torch.arange(base, base + 3 * d)}

    def neuron_in_rows(self, neuron: int) -> dict[str, torch.Tensor]:
        """Output rows of the MLP input projection(s) that produce neuron ``neuron``."""
        self.check_neuron(neuron)
        if self.mlp_in_layout == "concat":
            (path,) = self.mlp_in
            return {path: torch.tensor([neuron, self.n_neurons + neuron])}
        return {path: torch.tensor([neuron]) for path in self.mlp_in}

    # ---- validation ----------------------------------------------------------------------

    def check_layer(self, layer: int) -> None:
        _check_index("layer", layer, self.n_layers)

    def layers_or_all(self, layers: Any | None) -> list[int]:
        """Sorted, deduplicated, checked layer indices; ``None`` means every layer."""
        chosen = list(range(self.n_layers)) if layers is None else sorted({int(layer) for layer in layers})
        if not chosen:
            raise ValueError(f"`layers` is empty; pass layers in 0..{self.n_layers - 1} or None for all.")
        for layer in chosen:
            self.check_layer(layer)
        return chosen

    def check_head(self, head: int) -> None:
        _check_index("head", head, self.n_heads)

    def check_neuron(self, neuron: int) -> None:
        _check_index("neuron", neuron, self.n_neurons)


def _check_index(kind: str, value: int, size: int) -> None:
    if size <= 0:
        raise ValueError(f"ArchSpec has no sizes; call `spec_for(model)` instead of using a template ({kind}).")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{kind} index {value!r} is out of range: this model has {kind}s 0..{size - 1}.")


def _first_attr(config: Any, names: tuple[str, ...], default: Any = ...) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is ...:
        raise ValueError(f"config of type {type(config).__name__} has none of the attributes {names}.")
    return default


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        except (AttributeError, IndexError) as err:
            raise ValueError(f"module path {path!r} not found on {type(root).__name__} (failed at {part!r}).") from err
    return obj


def _unwrap(model: nn.Module) -> nn.Module:
    """Reach the transformers model under a PEFT wrapper, so specs work on both."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_LLAMA_LIKE = dict(
    layers="model.layers",
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    final_norm="model.norm",
)

_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Register ``spec`` for ``spec.model_type``.

    Example:
        >>> from mi_peft import arch
        >>> arch.register(arch.ArchSpec(model_type="my_llama", **arch.llama_like_paths()))
    """
    if spec.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"model_type {spec.model_type!r} is already registered; pass `overwrite=True` to replace it.")
    _REGISTRY[spec.model_type] = spec
    return spec


def llama_like_paths() -> dict[str, Any]:
    """Module paths shared by Llama-style models; a starting point for custom specs."""
    return dict(_LLAMA_LIKE)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def spec_for(model_or_config: Any) -> ArchSpec:
    """The :class:`ArchSpec` of a model, a PEFT-wrapped model or a config, with sizes filled in."""
    config = (
        getattr(_unwrap(model_or_config), "config", model_or_config)
        if isinstance(model_or_config, nn.Module)
        else model_or_config
    )
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"Unsupported architecture {model_type!r}. Supported model types: {', '.join(supported_model_types())}.\n"
            "Register one with, for example:\n"
            "    from mi_peft import arch\n"
            f"    arch.register(arch.ArchSpec(model_type={model_type!r}, layers='model.layers', "
            "attn_out='self_attn.o_proj', mlp_out='mlp.down_proj', "
            "qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'), "
            "mlp_in=('mlp.gate_proj', 'mlp.up_proj'), final_norm='model.norm'))"
        )
    return _REGISTRY[model_type].bind(config)


# What transformers' modelling code reads: `attention_bias` gives q/k/v/o a bias, Llama's `mlp_bias`
# gives gate/up/down one. Mistral, Qwen2 (q/k/v always biased, o never) and Phi-3 have no such flag.
_ATTENTION_BIAS = BiasSwitch("attention_bias", (*_LLAMA_LIKE["qkv"], _LLAMA_LIKE["attn_out"]))
_MLP_BIAS = BiasSwitch("mlp_bias", (*_LLAMA_LIKE["mlp_in"], _LLAMA_LIKE["mlp_out"]))
register(ArchSpec(model_type="llama", **_LLAMA_LIKE, attn_out_bias=_ATTENTION_BIAS, mlp_out_bias=_MLP_BIAS))
for _name in ("mistral", "qwen2"):
    register(ArchSpec(model_type=_name, **_LLAMA_LIKE))
for _name in ("qwen3", "gemma", "gemma2", "gemma3_text", "olmo2"):
    register(ArchSpec(model_type=_name, **_LLAMA_LIKE, attn_out_bias=_ATTENTION_BIAS))

register(
    ArchSpec(
        model_type="phi3",
        layers="model.layers",
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        qkv=("self_attn.qkv_proj",),
        qkv_layout="concat",
        mlp_in=("mlp.gate_up_proj",),
        mlp_in_layout="concat",
        final_norm="model.norm",
    )
)
register(
    ArchSpec(
        model_type="gpt2",
        layers="transformer.h",
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        qkv=("attn.c_attn",),
        qkv_layout="concat",
        mlp_in=("mlp.c_fc",),
        final_norm="transformer.ln_f",
        conv1d=True,
    )
)
register(
    ArchSpec(
        model_type="gpt_neox",
        layers="gpt_neox.layers",
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        qkv=("attention.query_key_value",),
        qkv_layout="interleaved",
        mlp_in=("mlp.dense_h_to_4h",),
        final_norm="gpt_neox.final_layer_norm",
        attn_out_bias=BiasSwitch("attention_bias", ("attention.query_key_value", "attention.dense")),
    )
)
