import pytest
import torch
from conftest import make_tiny
from peft import get_peft_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tk_models
from transformers import PreTrainedTokenizerFast

from mi_peft import SparseConfig
from mi_peft.evaluate.preference import preference_margin
from mi_peft.train import copy_reference_adapter, dpo, load_data, sft


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


HELD_OUT_DPO = [{"prompt": f"w{i} w{i + 2}", "chosen": " w7", "rejected": " w9"} for i in range(40, 48)]


def _completion_logp(model, tok, prompt: str, reply: str) -> float:
    """Summed log-prob of ``reply + EOS`` after ``prompt``, tokenized the way DPOTrainer does."""
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    ids = tok(prompt + reply + tok.eos_token, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))


def _first_rewards(run) -> tuple[float, float]:
    first = next(row for row in run.log_history if "rewards/chosen" in row)
    return first["rewards/chosen"], first["rewards/rejected"]


def test_dpo_changes_only_the_slices_and_grows_the_held_out_margin(tmp_path):
    model, tok = make_tiny("llama"), word_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_margin = preference_margin(model, tok, HELD_OUT_DPO).mean
    run = dpo(
        model, tok, DPO_ROWS, SparseConfig(**CONFIG), output_dir=tmp_path, max_steps=8, batch_size=4, learning_rate=1e-2
    )
    trained_margin = preference_margin(run.model, tok, HELD_OUT_DPO).mean
    assert trained_margin > base_margin + 0.5, (base_margin, trained_margin)
    merged = run.model.merge_and_unload().state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"}


def test_dpo_reference_is_the_model_with_the_adapter_disabled(tmp_path):
    """With a frozen random adapter (lr 0), the first logged rewards are beta x (adapter - base) log-probs."""
    tok, beta = word_tokenizer(), 0.5
    rows = [DPO_ROWS[0]] * 4  # every batch is the same pair, so the first log is that pair's reward
    config = SparseConfig(**CONFIG, init_weights=False)
    run = dpo(
        make_tiny("llama"),
        tok,
        rows,
        config,
        output_dir=tmp_path,
        max_steps=1,
        batch_size=4,
        learning_rate=0.0,
        beta=beta,
        logging_steps=1,
        precision="float32",  # the expected rewards are float32 log-probs; bf16 autocast is 2% off
    )
    row = rows[0]
    expected = []
    for key in ("chosen", "rejected"):
        policy = _completion_logp(run.model, tok, row["prompt"], row[key])
        with run.model.disable_adapter():
            base = _completion_logp(run.model, tok, row["prompt"], row[key])
        expected.append(beta * (policy - base))
    assert abs(expected[0]) > 1e-3  # the adapter really differs from the base
    assert _first_rewards(run) == pytest.approx(tuple(expected), abs=1e-4)


def test_dpo_after_sft_uses_the_sft_adapter_as_reference(tmp_path):
    """SFT -> DPO: the reference is a frozen copy of the SFT adapter, so the first rewards are 0."""
    tok = word_tokenizer()
    sft_run = sft(
        make_tiny("llama"),
        tok,
        SFT_ROWS,
        SparseConfig(**CONFIG),
        output_dir=tmp_path / "sft",
        max_steps=4,
        batch_size=4,
        learning_rate=1e-2,
    )
    with torch.no_grad(), sft_run.model.disable_adapter():
        base_logp = _completion_logp(sft_run.model, tok, DPO_ROWS[0]["prompt"], " w7")
    assert abs(_completion_logp(sft_run.model, tok, DPO_ROWS[0]["prompt"], " w7") - base_logp) > 1e-3
    run = dpo(
        sft_run.model,
        tok,
        [DPO_ROWS[0]] * 4,
        None,
        output_dir=tmp_path / "dpo",
        max_steps=1,
        batch_size=4,
        learning_rate=0.0,
        logging_steps=1,
    )
    assert _first_rewards(run) == pytest.approx((0.0, 0.0), abs=1e-6)
    assert copy_reference_adapter(run.model) > 0  # the reference adapter exists and is a copy


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


def test_recomputation_is_off_by_default_and_the_callers_choice_is_kept(tmp_path):
    """TRL turns activation checkpointing on; mi-peft turns it off under the name this transformers reads,
    with no deprecation warning, and a caller's `gradient_checkpointing=True` still takes effect."""
    import warnings

    def one_step(folder: str, **extra):
        rows, config = SFT_ROWS, SparseConfig(**CONFIG)
        return sft(
            make_tiny("llama"), word_tokenizer(), rows, config, output_dir=tmp_path / folder, max_steps=1, **extra
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        off = one_step("a")
    assert not _recomputes(off.model)
    assert not [w for w in caught if "`gradient_checkpointing` is deprecated" in str(w.message)]
    on = one_step("b", gradient_checkpointing=True)
    assert _recomputes(on.model)


def _recomputes(model) -> bool:
    base = model.get_base_model()
    return getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing  # < 5.25: old name
