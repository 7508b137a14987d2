"""``load_model("model.gguf")``: a llama.cpp file becomes a cached, trainable float model.

The GGUF is a tiny random Llama written here with the ``gguf`` package (Q8_0 weights, a byte-level
BPE vocabulary), so the test needs no download.
"""

from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mi_peft import SparseConfig, models
from mi_peft.cli import main
from mi_peft.train import sft

N_HEADS, N_KV_HEADS = 4, 2
TOKENS = [*bytes_to_unicode().values(), "<|endoftext|>", "Ġa", "Ġb", "ab"]
EOS = 256
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows in llama.cpp's rotary order (what its converter writes and transformers undoes)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    if hf_name in fixed:
        return fixed[hf_name] + ".weight"
    layer, module = hf_name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.weight"


def write_gguf(path, model=None, arch: str = "llama") -> None:
    """Write ``model`` as a llama.cpp GGUF (Q8_0 matrices), or metadata only when ``model`` is None."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    if model is not None:
        config = model.config
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(N_HEADS)
        writer.add_head_count_kv(N_KV_HEADS)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(config.hidden_size // N_HEADS)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(TOKENS)
        writer.add_token_types([3 if i == EOS else 1 for i in range(len(TOKENS))])
        writer.add_token_merges(["Ġ a", "Ġ b", "a b"])
        writer.add_eos_token_id(EOS)
        writer.add_bos_token_id(EOS)
        for name, tensor in model.state_dict().items():
            data = tensor.numpy()
            if "q_proj" in name or "k_proj" in name:
                data = _rotary_rows(data, N_HEADS if "q_proj" in name else N_KV_HEADS)
            if data.ndim == 2:
                q8 = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(_gguf_name(name), gguf.quants.quantize(data, q8), raw_dtype=q8)
            else:
                writer.add_tensor(_gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """``(original HF model, path of its GGUF)``, written once for the module."""
    model = tiny_llama()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    write_gguf(path, model)
    return model, path


@pytest.fixture
def gguf_file(tiny_gguf, tmp_path, monkeypatch):
    """A fresh copy of the tiny GGUF under ``tmp_path``, with mi-peft's cache in ``tmp_path/cache``."""
    monkeypatch.setenv("MI_PEFT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "models" / tiny_gguf[1].name
    path.parent.mkdir()
    shutil.copy2(tiny_gguf[1], path)
    return path


IDS = torch.tensor([[3, 70, 258, 100, 257, 5]])


def test_gguf_loads_as_float_model_equal_to_transformers_dequantization(gguf_file, tiny_gguf):
    model, tok = models.load_model(gguf_file)
    assert model.dtype == torch.float32 and not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert models.resolve(gguf_file) == str(models.gguf_cache_path(gguf_file))

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    with torch.no_grad():
        logits = model(IDS).logits
        torch.testing.assert_close(logits, reference(IDS).logits)
        torch.testing.assert_close(logits, tiny_gguf[0](IDS).logits, atol=0.05, rtol=0)  # Q8_0 rounding only
    assert tok("a b ab").input_ids == ref_tok("a b ab").input_ids
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"


def test_sft_trains_a_sparse_adapter_on_a_gguf_model(gguf_file, tmp_path):
    model, tok = models.load_model(gguf_file)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"prompt": "a b" * n, "completion": " ab"} for n in range(1, 9)]
    config = SparseConfig(heads={1: [0, 3]}, neurons={0: [5, 6]})
    run = sft(model, tok, rows, config, output_dir=tmp_path / "run", max_steps=3, batch_size=4, precision="float32")
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert len(run.losses) >= 1 and all(torch.isfinite(torch.tensor(run.losses)))
    merged = run.model.merge_and_unload().state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"}


def test_second_load_reads_the_cache_and_an_edited_file_converts_anew(gguf_file, monkeypatch):
    models.load_model(gguf_file)
    first = models.gguf_cache_path(gguf_file)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    real_convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    models.load_model(gguf_file)  # cached: no conversion

    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    with pytest.raises(AssertionError, match="converted again"):
        models.load_model(gguf_file)

    monkeypatch.setattr(models, "convert_gguf", real_convert)
    models.load_model(gguf_file)
    second = models.gguf_cache_path(gguf_file)
    assert second != first and (second / "model.safetensors").is_file()
    assert not first.exists(), "the copy of the earlier version of the file is removed"


def test_cli_info_accepts_a_gguf_path(gguf_file, capsys):
    assert main(["info", "--model", str(gguf_file)]) == 0
    out = capsys.readouterr().out
    assert "(llama)" in out and "heads:           4 per layer" in out


def test_missing_gguf_file_is_named(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf does not exist"):
        models.load_model(missing)


@pytest.mark.parametrize("arch", ["bert", "mamba"])
def test_gguf_architecture_mi_peft_cannot_load_is_named(arch, tmp_path, monkeypatch):
    """bert: transformers cannot dequantize it; mamba: it can, but mi-peft's arch map does not know it."""
    monkeypatch.setenv("MI_PEFT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch=arch)
    with pytest.raises(ValueError, match=rf"architecture '{arch}'.*GGUF architectures that work: .*llama.*qwen2"):
        models.load_model(path)
    assert not (tmp_path / "cache").exists()


def test_not_a_gguf_file_and_other_files_are_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="model.gguf is not a readable GGUF file"):
        models.load_model(fake)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"model.bin is a file, but mi-peft loads a \.gguf file"):
        models.load_model(weights)
