"""Precision: bfloat16 autocast is chosen by the CPU's flags, and it trains like float32 (loss within 2%)."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_train import word_tokenizer

from mi_peft import SparseConfig, precision
from mi_peft.recipe import load_recipe
from mi_peft.train import sft

AMX_XEON = "processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f avx512bw amx_bf16 amx_tile\n"
AVX512_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f avx512bw avx512vl\n"
EPYC_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
OLD_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize(
    ("cpuinfo", "flag"),
    [(AMX_XEON, "amx_bf16"), (EPYC_BF16, "avx512_bf16"), (GRAVITON3, "bf16"), (AVX512_ONLY, None), (OLD_ARM, None)],
)
def test_bf16_units_are_read_from_cpu_flags(cpuinfo, flag):
    assert precision.cpu_bf16_flag_from(cpuinfo) == flag


@pytest.fixture
def cpu_flag(monkeypatch):
    """Pretend the CPU reports the given bfloat16 flag (or none); CUDA is off."""

    def set_flag(flag, capability="AVX512"):
        monkeypatch.setattr(precision, "cpu_bf16_flag", lambda: flag)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    return set_flag


def test_auto_is_bfloat16_only_with_bf16_units(cpu_flag):
    cpu_flag("amx_bf16")
    assert precision.resolve_precision("auto") == "bfloat16"
    cpu_flag(None)
    assert precision.resolve_precision("auto") == "float32"
    assert precision.resolve_precision("bfloat16") == "bfloat16"  # explicit wins, even if slow
    with precision.autocast("auto"):
        assert not torch.is_autocast_enabled("cpu")
    cpu_flag("amx_bf16", capability="AVX2")  # torch capped below its AVX-512 kernels: bf16 would be emulated
    assert precision.resolve_precision("auto") == "float32"
    cpu_flag("bf16", capability="DEFAULT")  # Arm: the flag alone decides
    assert precision.resolve_precision("auto") == "bfloat16"
    cpu_flag("avx512_bf16")
    with precision.autocast("auto") as resolved:
        assert resolved == "bfloat16" and torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bad_precision_names_fail_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="must be one of auto, float32, bfloat16; got 'fp16'"):
        precision.resolve_precision("fp16")
    with pytest.raises(ValueError, match="train.precision.*got 'half'"):
        load_recipe("refusal", ["train.precision=half"])
    with pytest.raises(ValueError, match="evaluate.precision"):
        load_recipe("refusal", ["evaluate.precision=int8"])
    assert load_recipe("refusal").train.precision == "auto"
    assert load_recipe("refusal").evaluate.precision == "float32"


def _model():
    """A small Llama with realistic widths (multiples of 64), so bf16 matmuls take the real kernel paths."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


ROWS = [{"prompt": f"w{i} w{i + 1} w{i + 2}", "completion": f" w{(i * 7) % 90} w8 w9"} for i in range(10, 42)]


def test_bfloat16_training_follows_the_float32_loss_curve(tmp_path, cpu_flag):
    """20 sparse SFT steps: the bf16 curve stays within 2% of float32's at every step, and bf16 really ran."""
    cpu_flag("amx_bf16")  # "auto" must pick bf16 here whatever this CPU is; explicit names are checked too
    config = dict(heads={1: [0, 3]}, neurons={0: list(range(64))})
    curves, runs = {}, {}
    for name in ("float32", "auto"):
        run = sft(
            _model(),
            word_tokenizer(),
            ROWS,
            SparseConfig(**config),
            output_dir=tmp_path / name,
            max_steps=20,
            batch_size=8,
            learning_rate=3e-3,
            precision=name,
            logging_steps=1,
        )
        curves[name], runs[name] = torch.tensor(run.losses), run
    fp32, bf16 = curves["float32"], curves["auto"]
    assert len(fp32) == len(bf16) == 20
    assert fp32[-1] < 0.8 * fp32[0]  # it learns
    assert not torch.equal(fp32, bf16)  # bf16 autocast was really on
    torch.testing.assert_close(bf16, fp32, rtol=0.02, atol=0.0)


def test_a_model_trained_in_bfloat16_comes_back_computing_in_float32(tmp_path):
    """The trainer wraps forward in autocast; the returned model must match its reloaded adapter exactly."""
    from peft import PeftModel

    run = sft(
        _model(),
        word_tokenizer(),
        ROWS,
        SparseConfig(heads={1: [0, 3]}),
        output_dir=tmp_path / "run",
        max_steps=2,
        batch_size=8,
        precision="bfloat16",
    )
    ids = torch.arange(4, 68).reshape(1, 64)
    with torch.no_grad():
        returned = run.model.eval()(ids).logits
        reloaded = PeftModel.from_pretrained(_model(), tmp_path / "run").eval()(ids).logits
    assert returned.dtype == torch.float32
    torch.testing.assert_close(returned, reloaded, rtol=0.0, atol=1e-6)
