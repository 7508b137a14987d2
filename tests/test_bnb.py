"""Sparse adapters on bitsandbytes 4-bit bases, at the projection sizes real 4-bit models have.

bitsandbytes is a dev dependency, so these tests never skip: a 4-bit base that cannot run here is a
failure with bitsandbytes' own error. CPUs with AVX-512-BF16 repack 4-bit weights on the first
eval forward; ``_pack_like_avx512_bf16`` forces that repacking on any CPU so both CPU classes run
the same code path in every test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from mi_peft import SparseConfig, spec_for
from mi_peft.components import ComponentSet
from mi_peft.tuners._bnb_cpu import keep_4bit_layout_trainable

# head_dim 64, MLP 512: 4-bit blocks of 64 divide every projection, as in real 4-bit checkpoints
CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
HEADS = {0: [0, 1], 1: [3]}
NEURONS = {1: [2, 5, 40, 300]}


def _quantized(tmp_path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG, num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(1))


def _pack_like_avx512_bf16(model) -> None:
    """Make bitsandbytes repack the weights as it does on AVX-512-BF16 CPUs (eval, no grad)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(_ids())


def _packed_layers(model) -> int:
    return sum(
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def test_repeated_eval_calls_agree(tmp_path):
    model = _quantized(tmp_path)
    assert isinstance(model.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        first, second, third = (model(_ids()).logits for _ in range(3))
    assert torch.equal(first, second) and torch.equal(second, third)


def test_sparse_adapter_restores_trainable_layout(tmp_path):
    model = _quantized(tmp_path)
    keep_4bit_layout_trainable(model)
    with torch.no_grad():
        reference = model(_ids()).logits  # standard layout, on every CPU
    _pack_like_avx512_bf16(model)
    assert _packed_layers(model) == 2 * 7
    peft_model = get_peft_model(model, SparseConfig(heads=HEADS, neurons=NEURONS, head_mode="qkvo"))
    assert _packed_layers(model) == 0
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    with torch.no_grad():
        restored = peft_model(_ids()).logits
        again = peft_model(_ids()).logits  # an eval call after injection must not repack
    # packing stores the block scales in bfloat16, so the restored weights are as close as that allows
    assert torch.equal(restored, again)
    assert (restored - reference).abs().max() < 0.02 * reference.abs().max()
    assert _packed_layers(model) == 0
    assert keep_4bit_layout_trainable(model) == 0


def test_4bit_base_trains_only_slices_and_refuses_merge(tmp_path):
    model = _quantized(tmp_path)
    ids = _ids()
    with torch.no_grad():
        model(ids)  # an evaluation before the adapter exists: repacks the weights on AVX-512-BF16 CPUs
    config = SparseConfig(heads=HEADS, neurons=NEURONS, head_mode="qkvo", neuron_mode="in_out")
    peft_model = get_peft_model(model, config)
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(ids).logits
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, base_logits)
    expected = ComponentSet(heads=HEADS, neurons=NEURONS).num_parameters("qkvo", "in_out", spec=spec_for(model))
    assert peft_model.get_nb_trainable_parameters()[0] == expected
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):  # two steps: a later call must not break what the first one set up
        peft_model.train()
        optimizer.zero_grad()
        peft_model(ids, labels=ids).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        optimizer.step()
        peft_model.eval()
        with torch.no_grad():
            assert (peft_model(ids).logits - base_logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="quantized"):
        peft_model.merge_and_unload()


def test_input_side_modes_leave_4bit_logits_unchanged_at_init(tmp_path):
    model = _quantized(tmp_path)
    ids = _ids()
    peft_model = get_peft_model(
        model, SparseConfig(heads=HEADS, head_mode="bias", neurons=NEURONS, neuron_mode="scale")
    )
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(ids).logits
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, base_logits)


@pytest.mark.slow
def test_embedded_model_in_4bit(tmp_path):
    """The embedded model (576 = 9 x 64 wide) loads in 4-bit, answers, and a sparse adapter trains on it."""
    from mi_peft import load_model

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model, tok = load_model(quantization_config=quantization, device_map="cpu")
    assert isinstance(model.model.layers[10].mlp.down_proj, bnb.nn.Linear4bit)
    batch = tok(["The capital of France is"], return_tensors="pt")
    paris = tok(" Paris", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        first, second = (model(**batch).logits[0, -1] for _ in range(2))
    assert torch.equal(first, second) and int(first.argmax()) == paris
    peft_model = get_peft_model(model, SparseConfig(neurons={20: [1, 64, 700]}))
    peft_model.train()
    peft_model(**batch, labels=batch.input_ids).loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert len(grads) == 1 and grads[0].abs().sum() > 0


def test_this_file_also_passes_with_torch_kernels_limited_to_avx2():
    """The other CPU class: torch's kernels capped at AVX2 (``ATEN_CPU_CAPABILITY``).

    bitsandbytes picks its CPU 4-bit code path from the capability torch reports, so this reruns the
    tests above on the path a CPU without AVX-512 takes, whatever CPU runs the suite.
    """
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    capability = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert capability.stdout.strip() in ("AVX2", "DEFAULT"), capability.stdout
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not slow", "-k", "not avx2"],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-1000:]
