"""The sparse tuner: injects :class:`SparseLinear` layers where a :class:`SparseConfig` selects components."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...arch import spec_for
from ...fingerprint import stamp_or_check_fingerprint
from .._bnb_cpu import keep_4bit_layout_trainable
from .._merge import bias_refusal, merge_transaction, plan_biases, switch_off_biases, switch_on_biases
from ..steering.condition import SteeringCondition
from .config import ARCH_KEYS, ModuleSlices, SparseConfig, arch_record
from .gate import SparseGate, condition_record, continues_cache, decide_rows, model_inputs
from .layer import SparseLayer, SparseLinear


class SparseModel(BaseTuner):
    """Train only located heads and neurons of a transformers model (PEFT method ``"sparse"``).

    Module choice comes from :func:`mi_peft.arch.spec_for`, never from name guessing: a head lives in
    its columns of the attention output projection (and in ``qkvo`` mode its q/k/v rows), a neuron in
    its column of the MLP output projection (and in ``in_out`` mode its gate/up rows).

    ``merge_and_unload()`` adds each slice delta into its base weight (scale mode: ``s * W[:, cols]``,
    bias mode: ``W[:, cols] @ b`` into the projection bias) and ``unmerge()`` subtracts the same values
    again, so nothing dense is stored. A bias-free projection gets its bias through the architecture's
    config flag (:class:`~mi_peft.arch.BiasSwitch`), so the saved model reloads with it; a family without
    one refuses bias mode merges. Merges are all or nothing: an error leaves every weight as it was.
    An adapter with a ``condition`` (:meth:`set_condition`) applies only to the sequences the condition
    selects (:mod:`mi_peft.tuners.sparse.gate`) and is never merged, since merged weights would apply
    it to every sequence.
    Merging into a quantized (bitsandbytes) base is refused: re-quantizing is lossy; merge on an
    unquantized copy instead.

    Example:
        >>> from peft import get_peft_model
        >>> from mi_peft.tuners.sparse import SparseConfig
        >>> model = get_peft_model(base, SparseConfig(heads={12: [3]}, neurons={20: [5, 9]}))
        >>> model.print_trainable_parameters()
    """

    prefix: str = "sparse_"
    tuner_layer_cls = SparseLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, Any] | None = None,
    ) -> None:
        """Check the config against the model (architecture, ranges, fingerprint), then inject."""
        config: SparseConfig = self.peft_config[adapter_name]
        keep_4bit_layout_trainable(model)  # gradients flow through frozen 4-bit layers above the adapter
        self.__dict__.setdefault("_sparse_plans", {})[adapter_name] = self._prepare_sparse_config(model, config)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )

    @staticmethod
    def _prepare_sparse_config(model: nn.Module, config: SparseConfig) -> dict[str, ModuleSlices]:
        if not isinstance(config, SparseConfig):
            raise TypeError(f"SparseModel needs a SparseConfig, got {type(config).__name__}.")
        spec = spec_for(model)  # ValueError listing the supported architectures
        if config.arch is not None:
            recorded = {k: config.arch.get(k) for k in ("model_type", *ARCH_KEYS)}
            actual = arch_record(spec)
            diff = {k: (recorded[k], actual[k]) for k in recorded if recorded[k] != actual[k]}
            if diff:
                detail = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"this sparse adapter was made for another architecture ({detail}).")
        plan = config.module_slices(spec)  # ValueError naming the range of a bad layer/head/neuron
        if config.condition is not None:
            condition_record({**config.condition, "direction": config.condition_direction}, spec)
        stamp_or_check_fingerprint(config, model, "This sparse adapter")
        config.arch = arch_record(spec)
        config.target_modules = set(plan)
        return plan

    def _create_and_replace(
        self,
        peft_config: SparseConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        slices = self.__dict__["_sparse_plans"][adapter_name].get(current_key)
        if slices is None:
            raise ValueError(
                f"module {current_key!r} is not part of sparse adapter {adapter_name!r}; "
                f"it trains {sorted(self._sparse_plans[adapter_name])}."
            )
        if isinstance(target, SparseLayer):
            target.update_layer(
                adapter_name, slices, init_weights=peft_config.init_weights, inference_mode=peft_config.inference_mode
            )
            return
        new_module = self._create_new_module(peft_config, adapter_name, target, slices=slices)
        new_module.sparse_gate = self.sparse_gate
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until `set_adapter`
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        peft_config: SparseConfig, adapter_name: str, target: nn.Module, slices: ModuleSlices, **kwargs: Any
    ) -> SparseLinear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        backend = resolve_quantization_backend(base)
        quantized_linear = backend is not None and backend.layer_type == "linear"
        if not (isinstance(base, (nn.Linear, Conv1D)) or quantized_linear):
            raise TypeError(
                f"Target module {type(base).__name__} is not supported by sparse adapters; supported are "
                "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D` and quantized linear layers (bitsandbytes)."
            )
        return SparseLinear(target, adapter_name, slices, init_weights=peft_config.init_weights, **kwargs)

    # ---- conditional adapters ----------------------------------------------------------------

    @property
    def sparse_gate(self) -> SparseGate:
        """The sequences each conditional adapter applies to, shared by every sparse layer of this model."""
        gate = self.__dict__.get("_sparse_gate")
        if gate is None:
            gate = self.__dict__["_sparse_gate"] = SparseGate()
        return gate

    def set_condition(
        self, condition: SteeringCondition | dict[str, Any] | None, adapter_name: str | None = None
    ) -> None:
        """Apply adapter ``adapter_name`` (default: the active one) only where ``condition`` selects; ``None`` removes it.

        ``condition`` is a :class:`~mi_peft.tuners.steering.SteeringCondition`, e.g. the first value
        :meth:`SteeringConfig.calibrate_condition` returns. It is saved with the adapter.
        """
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; this model has {sorted(self.peft_config)}.")
        config = self.peft_config[name]
        if condition is None:
            config.condition = config.condition_direction = None
            return
        config.condition, config.condition_direction = condition_record(condition, spec_for(self.model))

    def _conditions(self) -> dict[str, tuple[dict, list[float]]]:
        return {
            name: (self.peft_config[name].condition, self.peft_config[name].condition_direction)
            for name in self.active_adapters
            if name in self.peft_config and getattr(self.peft_config[name], "condition", None) is not None
        }

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT enters this around every ``PeftModel`` forward and ``generate``: conditional adapters decide here.

        The decision is taken on this call's inputs (``generate``: the prompt) with the slices off and holds
        for every forward inside the call; it is kept afterwards for a backward that recomputes activations
        and for a forward continuing this call's KV cache.
        """
        conditions, gate = self._conditions(), self.sparse_gate
        if not conditions:
            gate.set_rows({})
            yield
            return
        if gate.locked or continues_cache(kwargs):
            yield
            return
        batch = model_inputs(args, kwargs)
        if batch is None:  # PeftModelForCausalLM.forward keeps its inputs here and passes them to `forward`
            with gate.deferred():
                yield
            return
        rows = decide_rows(self.model, gate, conditions, batch)
        with gate.locked_rows(rows):
            yield
        gate.set_rows(rows)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; a decision deferred by `_enable_peft_forward_hooks` is taken on these inputs."""
        gate = self.sparse_gate
        if gate.pending:
            batch = model_inputs(args, kwargs)
            if batch is None:
                raise ValueError("a conditional sparse adapter needs `input_ids` or `inputs_embeds` to decide on.")
            gate.set_rows(decide_rows(self.model, gate, self._conditions(), batch))
            gate.pending = False
        return self.model.forward(*args, **kwargs)

    def _check_merge_allowed(self) -> None:
        """Refuse up front (before touching any weight) when a base layer is quantized."""
        super()._check_merge_allowed()
        for name, module in self.model.named_modules():
            if isinstance(module, SparseLayer) and module.quantization_backend is not None:
                raise ValueError(
                    f"cannot merge a sparse adapter into the quantized layer {name} "
                    f"({module.quantization_backend.backend_name}): re-quantizing would lose exactness. Load the base "
                    "model unquantized, `PeftModel.from_pretrained(base, adapter_dir)`, then `merge_and_unload()`."
                )

    # ---- merging: all or nothing, biases declared in the config -----------------------------------

    def _bias_needs(self, adapter_names: list[str] | None) -> list[tuple[int, str]]:
        """(layer, projection path) of every bias mode slice about to be merged."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        return [
            (layer.sparse_slices[a].layer, layer.sparse_slices[a].path)
            for layer in self.model.modules()
            if isinstance(layer, SparseLayer)
            for a in names
            if a in layer.sparse_bias and a not in layer.merged_adapters
        ]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge into the base weights; on any error (NaN with ``safe_merge``, a refused layer) nothing changes."""
        self._check_merge_allowed()
        names = adapter_names if adapter_names is not None else self.active_adapters
        conditional = sorted(n for n in names if getattr(self.peft_config.get(n), "condition", None) is not None)
        if conditional:
            raise ValueError(
                f"cannot merge conditional sparse adapter(s) {conditional}: merged weights would apply them to every "
                "sequence. Use the adapter unmerged, or remove the condition first with `set_condition(None)`."
            )
        spec = spec_for(self.model)
        plan = plan_biases(self.model, spec, self._bias_needs(adapter_names))
        refusal = bias_refusal(spec, plan)
        if refusal:
            raise ValueError(f"cannot merge this sparse adapter (bias mode): {refusal}")
        with merge_transaction(self.model):
            switched = switch_on_biases(self.model, spec, plan.switches)
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        self.__dict__.setdefault("_sparse_switched_biases", []).append(switched)

    def unmerge_adapter(self) -> None:
        """Unmerge every layer, then drop the zero biases and config flags the merge added."""
        super().unmerge_adapter()
        for switched in reversed(self.__dict__.pop("_sparse_switched_biases", [])):
            switch_off_biases(switched)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Merge every layer first (all or nothing), then unwrap them."""
        if merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
            self.__dict__.pop("_sparse_switched_biases", None)  # merged for good: the biases stay
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
