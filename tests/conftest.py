"""Shared fixtures: tiny random models of every supported architecture, and the embedded model."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _llama_like(cls_name: str, **extra):
    return lambda: getattr(transformers, cls_name)(**TINY, num_key_value_heads=2, **extra)


TINY_CONFIGS = {
    "llama": _llama_like("LlamaConfig"),
    "mistral": _llama_like("MistralConfig"),
    "qwen2": _llama_like("Qwen2Config"),
    "qwen3": _llama_like("Qwen3Config", head_dim=8),
    "gemma": _llama_like("GemmaConfig", head_dim=8),
    "gemma2": _llama_like("Gemma2Config", head_dim=8),
    "gemma3_text": _llama_like("Gemma3TextConfig", head_dim=8),
    "phi3": _llama_like("Phi3Config", pad_token_id=0),
    "olmo2": _llama_like("Olmo2Config"),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**TINY),
}


def tiny_llama_with_real_tokenizer(folder: Path, layers: int = 2, initializer_range: float = 0.02) -> Path:
    """A random Llama (4 heads of 16 dims) saved to ``folder`` with the embedded model's tokenizer: its chat
    template lets SFT run on the recipes' conversational rows, and its real tokens occur in their pairs."""
    from mi_peft.models import resolve

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve(None))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny(model_type: str, seed: int = 0):
    """A tiny random model of ``model_type`` in eval mode (float32, eager attention)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture
def tiny_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one right-padded row
    return ids, mask


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, loaded once per test run."""
    from mi_peft import load_model

    return load_model()


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ``../shared/data`` (beside the repository); CI must have it, elsewhere a skip says why."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing: the public datasets folder ../shared/data must sit beside the repository"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_script(path: Path) -> ModuleType:
    """Import the script at ``path`` (recipe builders, examples, benchmarks: not a package, some names start
    with a digit). It is registered in ``sys.modules`` because dataclasses resolve annotations through it."""
    spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
