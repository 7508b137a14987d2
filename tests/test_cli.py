import json

import pytest
import torch
from conftest import make_tiny
from peft import get_peft_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tk_models
from transformers import PreTrainedTokenizerFast

from mi_peft import LocalizationResult, SparseConfig, SteeringConfig
from mi_peft.cli import main, parse_positions


def word_tokenizer_dir(path):
    """Save a tiny llama + word-level tokenizer like a hub model folder; return the folder."""
    make_tiny("llama").save_pretrained(path)
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *[f"w{i}" for i in range(94)]])}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return word_tokenizer_dir(tmp_path_factory.mktemp("tiny"))


def test_info_prints_counts(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "layers:          2" in out and "kv heads:        2" in out
    assert "qkvo" in out and "in_out" in out


def test_locate_writes_result_and_prints_table(tiny_dir, tmp_path, capsys):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"positive": f"w{i} w5 w6", "negative": f"w{i} w7 w8"} for i in range(10, 16)]))
    out = tmp_path / "loc"
    code = main(
        [
            "locate",
            "--model",
            str(tiny_dir),
            "--data",
            str(data),
            "--method",
            "mean_diff",
            "--out",
            str(out),
            "--top",
            "3",
        ]
    )
    assert code == 0
    assert (out / "scores.safetensors").is_file() and (out / "result.json").is_file()
    text = capsys.readouterr().out
    assert "top 3 heads" in text and "top 3 neurons" in text


def test_locate_passes_method_options(tiny_dir, tmp_path, capsys):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"positive": f"w{i} w5 w6", "negative": f"w{i} w7 w8"} for i in range(10, 16)]))
    args = ["locate", "--model", str(tiny_dir), "--data", str(data), "--method", "activation_stats"]
    assert main([*args, "--option", "stat=abs_diff", "--out", str(tmp_path / "loc")]) == 0
    assert LocalizationResult.load(tmp_path / "loc").extra["options"] == {"stat": "abs_diff"}
    capsys.readouterr()
    # an option the method does not take, a malformed one and a repeated one fail naming the fix
    assert main([*args, "--option", "norm=l2", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown options ['norm']; valid options:" in capsys.readouterr().err
    assert main([*args, "--option", "stat", "--out", str(tmp_path / "bad")]) == 2
    assert "write KEY=VALUE" in capsys.readouterr().err
    assert main([*args, "--option", "stat=fisher", "--option", "stat=abs_diff", "--out", str(tmp_path / "bad")]) == 2
    assert "is given twice" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_export_lora_gguf_and_gguf_lora(tiny_dir, tmp_path, capsys):
    import gguf
    from peft import LoraConfig

    from mi_peft.export import from_gguf_control_vector
    from mi_peft.models import load_model

    model, _ = load_model(tiny_dir)
    sparse = get_peft_model(model, SparseConfig(heads={1: [0]}, neurons={0: [3]}))
    sparse.save_pretrained(tmp_path / "sparse")
    assert main(["export", "lora", "--adapter", str(tmp_path / "sparse"), "--out", str(tmp_path / "lora")]) == 0
    lora = LoraConfig.from_pretrained(str(tmp_path / "lora"))
    assert set(lora.target_modules) == {"model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"}

    args = ["export", "gguf-lora", "--adapter", str(tmp_path / "sparse"), "--out", str(tmp_path / "sparse.gguf")]
    assert main(args) == 0
    reader = gguf.GGUFReader(str(tmp_path / "sparse.gguf"))
    names = {tensor.name for tensor in reader.tensors}
    assert names == {f"blk.{i}.{m}.weight.lora_{ab}" for i, m in ((1, "attn_output"), (0, "ffn_down")) for ab in "ab"}
    assert bytes(reader.get_field("adapter.type").parts[-1]).decode() == "lora"

    model, _ = load_model(tiny_dir)
    steer = get_peft_model(model, SteeringConfig.from_directions({1: torch.ones(32)}, layers=[1], alpha=2.0))
    steer.save_pretrained(tmp_path / "steer")
    assert main(["export", "gguf", "--adapter", str(tmp_path / "steer"), "--out", str(tmp_path / "s.gguf")]) == 0
    vectors = from_gguf_control_vector(tmp_path / "s.gguf")
    assert list(vectors) == [1]
    torch.testing.assert_close(vectors[1], torch.full((32,), 2.0 / 32**0.5))
    assert "wrote" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tiny_dir, tmp_path, capsys):
    assert (
        main(["locate", "--model", str(tiny_dir), "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    )
    assert "error" in capsys.readouterr().err
    assert (
        main(["train", "--model", str(tiny_dir), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    )


def test_parse_positions():
    assert parse_positions("last") == "last"
    assert parse_positions("-3,-1") == [-3, -1]
    with pytest.raises(ValueError, match="cannot parse positions"):
        parse_positions("first")


def test_train_writes_checkpoints_and_resumes(tiny_dir, tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w{i + 2} w{i + 3}"}) + "\n" for i in range(10, 40)))
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_dir), "--data", str(data), "--adapter", "lora", "--lora-r", "2"]
    common += ["--batch-size", "2", "--max-length", "16", "--out", str(out), "--save-steps", "1"]
    assert main([*common, "--steps", "2"]) == 0
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    assert main([*common, "--steps", "3", "--resume"]) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len([e for e in state["log_history"] if "loss" in e]) <= 3
