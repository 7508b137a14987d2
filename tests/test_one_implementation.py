"""One implementation per job: the prompt padder, the atomic folder writer, the logistic probe, derived target_modules."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import mi_peft
from mi_peft import _io, data
from mi_peft.evaluate import _batching
from mi_peft.locate.probes import fit_logistic, logistic_accuracy
from mi_peft.tuners.sparse import SparseConfig, save_adapter
from mi_peft.tuners.steering import SteeringConfig
from mi_peft.tuners.steering.condition import _layer_features

PADDING_ARCHS = ["gpt2", "llama", "gpt_neox", "qwen2", "gemma2", "phi3"]
PROMPTS = ["w1", "w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", "w13 w14 w15", "w16 w17 w18 w19 w20 w21"]
ROOT = Path(mi_peft.__file__).resolve().parent


def word_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer with ids below the tiny models' vocabulary; optionally adds ``<s>``."""
    names = ["<pad>", "<eos>", "<unk>", "<s>", *(f"w{i}" for i in range(60))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<s>"
    )


# ---- one prompt padder ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", PADDING_ARCHS)
def test_left_padding_changes_no_logit_of_a_real_token(arch):
    """Every real token's logits are the same alone and inside a left-padded batch (GPT-2: absolute positions)."""
    model, tok = make_tiny(arch), word_tokenizer()
    batch = data.tokenize(tok, PROMPTS)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        padded = model(**batch).logits
        for row, text in enumerate(PROMPTS):
            alone = model(**data.tokenize(tok, [text])).logits[0]
            real = batch["attention_mask"][row].bool()
            torch.testing.assert_close(padded[row, real], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", PADDING_ARCHS)
def test_condition_calibration_features_do_not_depend_on_padding(arch):
    """Calibration scores and mean activations are the same per prompt alone (batch 1) and left-padded (batch 4)."""
    model, tok = make_tiny(arch), word_tokenizer()
    layers = [0, 1]
    gen = torch.Generator().manual_seed(0)
    directions = {layer: torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0) for layer in layers}
    for dirs in (directions, None):
        alone = _layer_features(model, tok, PROMPTS, layers, dirs, "cosine", 1, "alone")
        padded = _layer_features(model, tok, PROMPTS, layers, dirs, "cosine", len(PROMPTS), "padded")
        for layer in layers:
            torch.testing.assert_close(padded[layer], alone[layer], atol=1e-5, rtol=1e-5)


def test_bos_rule_adds_bos_once():
    tok = word_tokenizer(bos=True)
    assert data.encode(tok, "w1 w2") == [3, 5, 6]
    assert data.encode(tok, "<s> w1 w2") == [3, 5, 6]  # a text that starts with BOS gets no second one
    assert data.encode(tok, "w1 w2", special=False) == [5, 6]


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert data.position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    batch = data.left_padded_batch(word_tokenizer(), [[5], [5, 6, 7]])
    assert batch["input_ids"].tolist() == [[0, 0, 5], [5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 0, 0], [0, 1, 2]]
    with pytest.raises(ValueError, match="side"):
        data.pad([[5]], 0, side="middle")


def test_evaluation_batching_reexports_the_shared_padder():
    for name in ("encode", "pad", "pad_id", "check_positive", "check_texts"):
        assert getattr(_batching, name) is getattr(data, name), name
    ids, mask = _batching.pad([[5, 6], [7]], 0, side="right")
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[1, 1], [1, 0]]


# ---- one atomic folder writer ----------------------------------------------------------------


def _write_files(names: dict[str, str]):
    def write(folder: Path) -> None:
        for name, text in names.items():
            (folder / name).write_text(text)

    return write


def _previous(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    _io.write_folder_atomically(target, _write_files({"a.json": "old", "b.bin": "old"}))
    return target


def _assert_untouched(tmp_path: Path, target: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.json": "old", "b.bin": "old"}


def test_failure_inside_write_leaves_previous_folder(tmp_path):
    target = _previous(tmp_path)

    def write(folder: Path) -> None:
        (folder / "a.json").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.write_folder_atomically(target, write)
    _assert_untouched(tmp_path, target)


def test_failure_of_the_final_move_restores_previous_folder(tmp_path, monkeypatch):
    target = _previous(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        _io.write_folder_atomically(target, _write_files({"a.json": "new", "b.bin": "new"}))
    _assert_untouched(tmp_path, target)


def test_overwrite_rule_replaces_a_resave_and_refuses_foreign_files(tmp_path):
    target = _previous(tmp_path)
    _io.write_folder_atomically(target, _write_files({"a.json": "new", "b.bin": "new"}))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.json": "new", "b.bin": "new"}
    _io.write_folder_atomically(target, _write_files({"a.json": "old", "b.bin": "old"}))
    with pytest.raises(ValueError, match=r"holds files this save does not write \(\['b.bin'\]\)"):
        _io.write_folder_atomically(target, _write_files({"a.json": "new"}))
    _assert_untouched(tmp_path, target)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        _io.write_folder_atomically(tmp_path / "file", _write_files({"a.json": "new"}))


def _fail_adapter_save(target: Path, monkeypatch) -> None:
    class Broken:
        def save_pretrained(self, path):
            Path(path, "a.json").write_text("new")
            raise OSError("disk full")

    save_adapter(Broken(), target)


def _fail_lora_export(target: Path, monkeypatch) -> None:
    from peft import LoraConfig

    from mi_peft.export import lora

    monkeypatch.setattr(lora, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    lora._write_folder(target, LoraConfig(r=1, target_modules=["q_proj"]), {})


def _fail_embedded_conversion(target: Path, monkeypatch) -> None:
    from mi_peft import models

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    monkeypatch.setattr(models, "embedded_gguf_path", lambda: target.parent / "model.gguf")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: make_tiny("llama"))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: BrokenTokenizer())
    models._convert_embedded(target)


@pytest.mark.parametrize("writer", [_fail_adapter_save, _fail_lora_export, _fail_embedded_conversion])
def test_every_folder_writer_keeps_the_previous_folder_on_failure(writer, tmp_path, monkeypatch):
    target = _previous(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        writer(target, monkeypatch)
    _assert_untouched(tmp_path, target)


def test_no_module_keeps_its_own_temporary_folder_code():
    users = [p for p in ROOT.rglob("*.py") if "mkdtemp" in p.read_text() and p.name != "_io.py"]
    assert users == []


# ---- one logistic probe ----------------------------------------------------------------------


def test_logistic_probe_finds_the_separating_direction():
    gen = torch.Generator().manual_seed(0)
    n, d = 128, 64
    x = torch.randn(n, 2, d, generator=gen)
    y = (torch.arange(n) % 2).float()
    x[:, 0, 0] += 4 * (2 * y - 1)  # column 0 separable along feature 0; column 1 pure noise
    weight, bias = fit_logistic(x, y, l2=1e-2, steps=100)
    accuracy = logistic_accuracy(x, y, weight, bias)
    assert accuracy[0] == 1.0
    assert torch.nn.functional.cosine_similarity(weight[0], torch.eye(d)[0], dim=0) > 0.8
    assert weight.shape == (2, d) and bias.shape == (2,)


def test_directions_and_causal_probe_share_the_logistic_regression():
    source = (ROOT / "locate" / "directions.py").read_text()
    assert "LBFGS" not in source and "binary_cross_entropy" not in source
    assert "fit_logistic" in source


# ---- module structure ------------------------------------------------------------------------


def _relative_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


def test_steering_state_breaks_the_layer_model_import_cycle():
    steering = ROOT / "tuners" / "steering"
    assert "model" not in _relative_imports(steering / "layer.py")
    assert _relative_imports(steering / "state.py") == set()
    assert {"state", "layer"} <= _relative_imports(steering / "model.py")


@pytest.mark.parametrize("module", ["data.py", "capture.py", "locate/result.py", "locate/causal.py"])
def test_split_modules_stay_small(module):
    assert len((ROOT / module).read_text().splitlines()) < 400


# ---- derived target_modules ------------------------------------------------------------------


def _steering_config(**kwargs) -> SteeringConfig:
    return SteeringConfig.from_directions({1: torch.ones(32)}, layers=[1], alpha=2.0, **kwargs)


def test_hand_set_target_modules_are_refused():
    with pytest.raises(ValueError, match=r"`target_modules` is derived from `heads`/`neurons`.*`heads=`"):
        SparseConfig(heads={0: [1]}, target_modules=["model.layers.0.self_attn.o_proj"])
    with pytest.raises(ValueError, match=r"`target_modules` is derived from `layers`.*`layers=`"):
        _steering_config(target_modules=["model.layers.1"])


@pytest.mark.parametrize("make_config", [lambda: SparseConfig(heads={0: [1]}, init_weights=False), _steering_config])
def test_saved_target_modules_load_back(make_config, tmp_path):
    model = make_tiny("llama")
    peft_model = get_peft_model(make_tiny("llama"), make_config())
    saved = save_adapter(peft_model, tmp_path / "adapter")
    written = json.loads((saved / "adapter_config.json").read_text())["target_modules"]
    assert written  # PEFT wrote the derived names
    loaded = PeftModel.from_pretrained(model, str(saved))
    assert sorted(loaded.peft_config["default"].target_modules) == sorted(written)
    ids = torch.randint(4, 60, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)
