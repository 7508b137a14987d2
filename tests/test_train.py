import pytest
import torch
from conftest import make_tiny
from peft import get_peft_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tk_models
from transformers import PreTrainedTokenizerFast

from mi_peft import SparseConfig
from mi_peft.train import dpo, load_data, sft


def word_tokenizer():
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *[f"w{i}" for i in range(94)]])}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


SFT_ROWS = [{"prompt": f"w{i} w{i + 1}", "completion": " w7 w8"} for i in range(10, 18)]
DPO_ROWS = [{"prompt": f"w{i} w{i + 1}", "chosen": " w7", "rejected": " w9"} for i in range(10, 18)]
CONFIG = dict(heads={1: [0, 3]}, neurons={0: [5, 6]})


def test_sft_trains_only_the_sparse_slices(tmp_path):
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = sft(model, word_tokenizer(), SFT_ROWS, SparseConfig(**CONFIG), output_dir=tmp_path, max_steps=3, batch_size=4)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert len(run.losses) >= 1 and all(torch.isfinite(torch.tensor(run.losses)))
    assert run.trainable_parameters == 2 * 32 * 8 + 2 * 32
    merged = run.model.merge_and_unload().state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"}


def test_dpo_smoke(tmp_path):
    run = dpo(
        make_tiny("llama"),
        word_tokenizer(),
        DPO_ROWS,
        SparseConfig(**CONFIG),
        output_dir=tmp_path,
        max_steps=2,
        batch_size=4,
    )
    assert run.trainable_parameters > 0 and (tmp_path / "adapter_model.safetensors").is_file()
    assert any("rewards/margins" in row for row in run.log_history)


def test_bad_input_fails_before_training(tmp_path):
    tok = word_tokenizer()
    with pytest.raises(
        ValueError, match=r"needs columns prompt\+chosen\+rejected; the dataset has \['completion', 'prompt'\]"
    ):
        dpo(make_tiny("llama"), tok, SFT_ROWS, SparseConfig(**CONFIG), output_dir=tmp_path)
    with pytest.raises(ValueError, match="pass `peft_config="):
        sft(make_tiny("llama"), tok, SFT_ROWS, None, output_dir=tmp_path)
    peft_model = get_peft_model(make_tiny("llama"), SparseConfig(**CONFIG))
    with pytest.raises(ValueError, match="already a PeftModel"):
        sft(peft_model, tok, SFT_ROWS, SparseConfig(**CONFIG), output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="training data is empty"):
        load_data([])


@pytest.mark.slow
def test_dpo_smoke_on_embedded_model(embedded, tmp_path):
    import copy

    model, tok = embedded
    rows = [
        {
            "prompt": [{"role": "user", "content": "How do I pick a lock to break into a house?"}],
            "chosen": [{"role": "assistant", "content": "I'm sorry, but I can't help with that."}],
            "rejected": [{"role": "assistant", "content": "Sure, first insert a tension wrench."}],
        }
    ] * 4
    config = SparseConfig(heads={12: [3]}, neurons={20: [5, 9]})
    run = dpo(copy.deepcopy(model), tok, rows, config, output_dir=tmp_path, max_steps=2, batch_size=2)
    assert run.trainable_parameters == 36864 + 2 * 576
    assert any("rewards/margins" in row for row in run.log_history)
    assert (tmp_path / "adapter_model.safetensors").is_file()
