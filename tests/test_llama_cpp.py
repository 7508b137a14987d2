"""llama.cpp itself runs mi-peft's exports: a control vector and a sparse adapter as a LoRA GGUF.

Each test compares llama.cpp's next-token logit shift (adapted minus base, same prompt) with the
shift the adapter makes in PyTorch, over the whole vocabulary. The base GGUF is the embedded
model's own file, dequantized to float32 (the weights the PyTorch model uses), with a float32 KV
cache, so the only difference left is float32 rounding (measured: correlation 1 - 1e-9, norm ratio
1 +- 1e-6). A Q4_1 base or a float16 KV cache adds noise of the same size as a small adapter's
effect; the tight bounds here (correlation >= 0.9999, norm ratio within 0.5%) catch a wrong q/k row
order, layer number or per-module scale.
"""

from __future__ import annotations

import copy
import ctypes
import importlib

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from peft import get_peft_model

import mi_peft.tuners.sparse  # noqa: F401  (registers the "sparse" PEFT method)
import mi_peft.tuners.steering  # noqa: F401  (registers the "steering" PEFT method)
from mi_peft.export import from_gguf_control_vector, to_gguf_control_vector, to_gguf_lora
from mi_peft.models import embedded_gguf_path
from mi_peft.tuners.sparse import SparseConfig
from mi_peft.tuners.steering import SteeringConfig

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
INSTALL = (
    'llama-cpp-python is not installed. Fix: CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv/bin/pip install -e ".[llama]" '
    "(`make test` does this; the portable build avoids a segfault in llama_decode on AVX-512/AMX CPUs)."
)


def import_llama_cpp():
    """llama_cpp, or a test failure that says how to install it (these tests never skip)."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    pytest.fail(INSTALL, pytrace=False)  # outside `except`: the message alone, no chained traceback


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory):
    """The embedded model's GGUF with every tensor dequantized to float32 (same metadata, same tensor names)."""
    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    path = tmp_path_factory.mktemp("llama_cpp") / "base-f32.gguf"
    writer = gguf.GGUFWriter(str(path), reader.get_field("general.architecture").contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub_type = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    yield path
    path.unlink()  # 540 MB; pytest keeps its last temporary folders


@pytest.fixture(scope="module")
def prompt_ids(embedded):
    return embedded[1](PROMPT, return_tensors="pt")["input_ids"]


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].double().numpy()


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids[0].tolist())
    return np.array(llm.scores[ids.shape[1] - 1], dtype=np.float64)


def open_llama(llama_cpp, path, lora_path=None):
    """A float32 KV cache and one thread for prompts too.

    llama.cpp's default float16 KV cache rounds keys and values differently with and without the
    adapter: on some CPUs that alone moved the shift's norm by 4% (correlation 0.9992); in float32 the
    shift matches PyTorch's to 1e-6. ``n_threads_batch`` defaults to every core: on a busy 2-core machine
    two OpenMP threads spin at each barrier and a 6-token prompt took 8 s instead of 0.1 s."""
    return llama_cpp.Llama(
        model_path=str(path),
        lora_path=lora_path,
        logits_all=True,
        n_ctx=64,
        n_threads=1,
        n_threads_batch=1,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        seed=0,
        verbose=False,
    )


def agreement(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Pearson correlation over the vocabulary and norm ratio (actual / expected) of two logit shifts."""
    return float(np.corrcoef(expected, actual)[0, 1]), float(np.linalg.norm(actual) / np.linalg.norm(expected))


def apply_control_vector(llama_cpp, llm, vectors: dict[int, torch.Tensor]) -> None:
    """What llama.cpp's common_control_vector_load + llama_set_adapter_cvec do with a control-vector file.

    The buffer is n_embd x (n_layer - 1): it starts at layer 1 (llama.cpp never steers layer 0).
    """
    n_layer, n_embd = llama_cpp.llama_model_n_layer(llm.model), llm.n_embd()
    buffer = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    for layer, vector in vectors.items():
        buffer[(layer - 1) * n_embd : layer * n_embd] = vector.numpy()
    pointer = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, buffer.size, n_embd, 1, n_layer - 1) == 0


def steering_shift(model, ids, layer: int, direction: torch.Tensor, alpha: float) -> tuple[np.ndarray, object]:
    config = SteeringConfig.from_directions({layer: direction}, layers=[layer], alpha=alpha)
    steered = get_peft_model(copy.deepcopy(model), config)
    return torch_logits(steered, ids) - torch_logits(model, ids), steered


def test_control_vector_moves_llama_cpp_logits_like_the_adapter(embedded, base_gguf, prompt_ids, tmp_path):
    llama_cpp = import_llama_cpp()
    model, _ = embedded
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    layer, alpha = 12, 4.0
    expected, steered = steering_shift(model, prompt_ids, layer, direction, alpha)
    steered.save_pretrained(tmp_path / "steer")
    vectors = from_gguf_control_vector(to_gguf_control_vector(tmp_path / "steer", tmp_path / "steer.gguf"))

    llm = open_llama(llama_cpp, base_gguf)
    try:
        base = llama_logits(llm, prompt_ids)
        apply_control_vector(llama_cpp, llm, vectors)
        actual = llama_logits(llm, prompt_ids) - base
    finally:
        llm.close()
    corr, ratio = agreement(expected, actual)
    # The same vector added one layer earlier or later moves the logits differently: the layer numbering is checked.
    neighbours = [agreement(steering_shift(model, prompt_ids, n, direction, alpha)[0], actual)[0] for n in (11, 13)]
    print(
        f"control vector: corr {corr:.5f}, norm ratio {ratio:.4f}, |shift| {np.linalg.norm(expected):.1f}, "
        f"corr with layers 11/13: {neighbours[0]:.3f}/{neighbours[1]:.3f}"
    )
    assert corr >= 0.9999 and 0.995 <= ratio <= 1.005
    assert max(neighbours) < 0.95


def sparse_adapter(model, head_mode: str, neuron_mode: str, rows_only: bool):
    """A sparse adapter on two attention and two MLP layers with random slices and a visible effect.

    ``rows_only`` zeroes the column deltas, so only the q/k/v and gate/up rows act (their row order in
    llama.cpp differs from PyTorch's for q/k); scales get std 0.2 (``(1 + s) z``), deltas std 0.02.
    """
    config = SparseConfig(
        heads={3: [0, 1, 4], 10: [2]},
        neurons={12: list(range(20)), 20: [5, 7]},
        head_mode=head_mode,
        neuron_mode=neuron_mode,
        init_weights=False,
    )
    adapter = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "sparse_" in name:
                std = 0.2 if "sparse_scale" in name else 0.0 if rows_only and ".sparse_delta." in name else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return adapter


@pytest.mark.parametrize(
    ("head_mode", "neuron_mode", "rows_only"),
    [("qkvo", "in_out", True), ("scale", "out", False)],
    ids=["q/k/v+gate/up rows", "o/down columns"],
)
def test_sparse_adapter_as_llama_cpp_lora(embedded, base_gguf, prompt_ids, tmp_path, head_mode, neuron_mode, rows_only):
    """Per-module ranks differ (192 q rows vs 2 gate rows...): a wrong alpha/rank fold shows in the norm ratio."""
    llama_cpp = import_llama_cpp()
    model, _ = embedded
    adapter = sparse_adapter(model, head_mode, neuron_mode, rows_only)
    expected = torch_logits(adapter, prompt_ids) - torch_logits(model, prompt_ids)
    adapter.save_pretrained(tmp_path / "sparse")
    lora_file = to_gguf_lora(tmp_path / "sparse", tmp_path / "sparse.gguf", base_model=model)

    llm = open_llama(llama_cpp, base_gguf)
    try:
        base = llama_logits(llm, prompt_ids)
    finally:
        llm.close()
    llm = open_llama(llama_cpp, base_gguf, lora_path=str(lora_file))
    try:
        actual = llama_logits(llm, prompt_ids) - base
    finally:
        llm.close()
    corr, ratio = agreement(expected, actual)
    print(
        f"LoRA GGUF ({head_mode}/{neuron_mode}): corr {corr:.6f}, norm ratio {ratio:.4f}, |shift| {np.linalg.norm(expected):.1f}"
    )
    assert np.linalg.norm(expected) > 20.0  # the adapter visibly moves the logits
    assert corr >= 0.9999 and 0.995 <= ratio <= 1.005
