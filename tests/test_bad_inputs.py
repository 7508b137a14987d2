"""Every public entry point turns bad input into a clear error that names the problem.

One table row per case: (builder of the bad call, expected exception type, a phrase of its message).
Builders take the ``saved`` folders (adapters saved on tiny models, some of them damaged) and run on
tiny random models only.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny
from peft import PeftModel, get_peft_model

from mi_peft import ContrastivePairs, SparseConfig, SteeringConfig, capture, locate, spec_for
from mi_peft.checkpoints import ADAPTER_WEIGHTS
from mi_peft.export import to_gguf_control_vector
from mi_peft.fingerprint import FingerprintMismatchError
from mi_peft.locate import LocalizationResult
from mi_peft.metrics import get_metric
from mi_peft.recipe import load_recipe
from mi_peft.tuners._registry import DamagedAdapterError

D_MODEL = 32  # tiny llama: 2 layers, 4 heads, 48 neurons, d_model 32


def _llama():
    return make_tiny("llama")


def _ids() -> torch.Tensor:
    return torch.randint(3, 90, (2, 64), generator=torch.Generator().manual_seed(0))


def _inject(config: Any) -> Any:
    return get_peft_model(_llama(), config)


def _steer(vector: torch.Tensor, **kwargs: Any) -> SteeringConfig:
    return SteeringConfig.from_directions(vector, layers=kwargs.pop("layers", [0]), **kwargs)


def _budget(value: float) -> SparseConfig:
    model = _llama()
    gen = torch.Generator().manual_seed(0)
    scores = {"heads": torch.randn(2, 4, generator=gen), "neurons": torch.randn(2, 48, generator=gen)}
    result = LocalizationResult.from_model(model, scores, method="test", metric="test")
    return SparseConfig.from_localization(result, param_budget=value)


def _forward_steering_without_direction(_saved: dict[str, Path]) -> None:
    model = _inject(SteeringConfig(op="add", layers=[0]))
    model(input_ids=_ids())


def _record_with_unknown_positions(_saved: dict[str, Path]) -> None:
    model = _llama()
    with capture.record(model, heads=True, positions="first"):
        model(input_ids=_ids())


def _recipe_with_unknown_field(saved: dict[str, Path]) -> None:
    path = saved["root"] / "recipe.yaml"
    path.write_text("name: bad\nbogus_field: 1\n")
    load_recipe(path)


class Unsupported:
    model_type = "mystery"


Case = tuple[str, Callable[[dict[str, Path]], Any], type[Exception], str]

CASES: list[Case] = [
    # sparse adapters
    ("sparse-layer", lambda s: _inject(SparseConfig(heads={5: [0]})), ValueError, r"layer index 5 .*0\.\.1"),
    ("sparse-head", lambda s: _inject(SparseConfig(heads={0: [9]})), ValueError, r"head index 9 .*0\.\.3"),
    ("sparse-neuron", lambda s: _inject(SparseConfig(neurons={0: [48]})), ValueError, r"neuron index 48 .*0\.\.47"),
    ("sparse-negative", lambda s: SparseConfig(heads={0: [-1]}), ValueError, "negative index -1"),
    ("sparse-head-mode", lambda s: SparseConfig(heads={0: [1]}, head_mode="x"), ValueError, "`head_mode` must be"),
    ("sparse-neuron-mode", lambda s: SparseConfig(neurons={0: [1]}, neuron_mode="x"), ValueError, "`neuron_mode`"),
    ("sparse-empty", lambda s: _inject(SparseConfig()), ValueError, "selects nothing"),
    # parameter budgets
    ("budget-zero", lambda s: _budget(0), ValueError, r"fraction in \(0, 1\) or a count >= 1, got 0"),
    ("budget-negative", lambda s: _budget(-0.1), ValueError, r"fraction in \(0, 1\) or a count >= 1, got -0.1"),
    ("budget-above-one", lambda s: _budget(1.5), ValueError, "is a parameter count and must be whole, got 1.5"),
    ("budget-nan", lambda s: _budget(float("nan")), ValueError, "got nan"),
    ("budget-too-small", lambda s: _budget(1), ValueError, "selects nothing: the cheapest component costs"),
    # steering adapters
    ("steer-op", lambda s: SteeringConfig(op="x", layers=[0]), ValueError, "`op` must be one of"),
    ("steer-positions", lambda s: _steer(torch.ones(D_MODEL), positions="x"), ValueError, "`positions` must be"),
    ("steer-nan", lambda s: _steer(torch.full((D_MODEL,), float("nan"))), ValueError, "NaN or infinite"),
    ("steer-inf", lambda s: _steer(torch.full((D_MODEL,), float("inf"))), ValueError, "NaN or infinite"),
    ("steer-zero", lambda s: _steer(torch.zeros(D_MODEL)), ValueError, "is the zero vector"),
    ("steer-size", lambda s: _inject(_steer(torch.ones(31))), ValueError, "31 entries .*d_model=32"),
    ("steer-layer", lambda s: _inject(_steer(torch.ones(D_MODEL), layers=[5])), ValueError, "layer index 5"),
    ("steer-head", lambda s: _inject(SteeringConfig(head_scales={0: {9: 0.5}})), ValueError, "head index 9"),
    ("steer-neuron", lambda s: _inject(SteeringConfig(neuron_scales={0: {48: 0.5}})), ValueError, "neuron index 48"),
    (
        "steer-alpha",
        lambda s: _steer(torch.ones(D_MODEL), alpha=float("nan")),
        ValueError,
        "`alpha` must be a finite number, got nan",
    ),
    ("steer-no-direction", _forward_steering_without_direction, ValueError, "has no direction at layer 0"),
    # contrastive data
    ("pairs-unequal", lambda s: ContrastivePairs(["a", "b"], ["c"]), ValueError, "`positive` has 2 items but"),
    ("pairs-empty", lambda s: ContrastivePairs(positive=[], negative=[]), ValueError, "no contrastive pairs"),
    ("pairs-not-text", lambda s: ContrastivePairs(["a", 3], ["c", "d"]), ValueError, "must be a string, got int"),
    ("pairs-column", lambda s: ContrastivePairs.load([{"positive": "a"}]), ValueError, "column 'negative' not found"),
    ("pairs-file", lambda s: ContrastivePairs.load(s["root"] / "no.json"), ValueError, "does not exist"),
    ("pairs-subset", lambda s: ContrastivePairs(["a"], ["b"]).subset(2), ValueError, "at most the number of pairs"),
    # locate, metrics, capture, architectures, recipes
    (
        "locate-method",
        lambda s: locate(_llama(), None, ContrastivePairs(["a"], ["b"]), method="x"),
        ValueError,
        "unknown method 'x'; choose",
    ),
    ("metric-name", lambda s: get_metric("refusl", None), ValueError, "unknown metric 'refusl'; valid names"),
    (
        "ablate-mode",
        lambda s: capture.ablate(_llama(), heads={0: [0]}, mode="x").__enter__(),
        ValueError,
        "`mode` must be 'zero' or 'mean'",
    ),
    ("record-positions", _record_with_unknown_positions, ValueError, "`positions` must be 'last', 'all', 'mean'"),
    ("architecture", lambda s: spec_for(Unsupported()), ValueError, "Unsupported architecture 'mystery'"),
    ("recipe-field", _recipe_with_unknown_field, ValueError, r"unknown top-level field\(s\) \['bogus_field'\]"),
    # saved adapters on the wrong base, damaged files
    (
        "fingerprint",
        lambda s: PeftModel.from_pretrained(make_tiny("llama", seed=1), s["sparse"]),
        ValueError,
        "different base model",
    ),
    (
        "other-arch",
        lambda s: PeftModel.from_pretrained(make_tiny("qwen3"), s["sparse"]),
        ValueError,
        "made for another architecture",
    ),
    (
        "steer-other-arch",
        lambda s: PeftModel.from_pretrained(make_tiny("gpt2"), s["steer"]),
        ValueError,
        "different base model",
    ),
    ("damaged-sparse", lambda s: PeftModel.from_pretrained(_llama(), s["sparse_cut"]), ValueError, "are damaged"),
    ("damaged-steer", lambda s: PeftModel.from_pretrained(_llama(), s["steer_cut"]), ValueError, "are damaged"),
    ("damaged-gguf", lambda s: to_gguf_control_vector(s["steer_cut"], s["root"] / "v.gguf"), ValueError, "damaged"),
]

EXACT_TYPES = {
    "fingerprint": FingerprintMismatchError,
    "steer-other-arch": FingerprintMismatchError,
    "damaged-sparse": DamagedAdapterError,
    "damaged-steer": DamagedAdapterError,
    "damaged-gguf": DamagedAdapterError,
}


def _truncated_copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    weights = target / ADAPTER_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return target


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A sparse and a steering adapter saved on the tiny llama, and truncated copies of both."""
    root = tmp_path_factory.mktemp("adapters")
    _inject(SparseConfig(heads={0: [1]}, neurons={1: [2]}, init_weights=False)).save_pretrained(root / "sparse")
    direction = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(0))
    _inject(_steer(direction, layers=[1])).save_pretrained(root / "steer")
    return {
        "root": root,
        "sparse": root / "sparse",
        "steer": root / "steer",
        "sparse_cut": _truncated_copy(root / "sparse", root / "sparse_cut"),
        "steer_cut": _truncated_copy(root / "steer", root / "steer_cut"),
    }


def test_table_covers_many_entry_points():
    assert len(CASES) >= 20 and len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "build", "error", "phrase"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_raises_a_clear_error(saved, name, build, error, phrase):
    with pytest.raises(error, match=phrase) as raised:
        build(saved)
    assert isinstance(raised.value, EXACT_TYPES.get(name, error))
    assert len(str(raised.value)) >= 20  # a sentence, not a bare value


@pytest.mark.parametrize("kind", ["sparse", "steer"])
def test_damaged_adapter_error_names_file_size_and_recovery(saved, kind):
    folder = saved[f"{kind}_cut"]
    weights = folder / ADAPTER_WEIGHTS
    with pytest.raises(DamagedAdapterError) as raised:
        PeftModel.from_pretrained(_llama(), folder)
    message = str(raised.value)
    assert str(weights) in message and f"({weights.stat().st_size} bytes)" in message
    assert "truncated" in message
    for recovery in ("save_pretrained", "download it again", "mi_peft.checkpoints.load_checkpoint"):
        assert recovery in message


@pytest.mark.parametrize("kind", ["sparse", "steer"])
def test_restored_adapter_loads_again(saved, kind, tmp_path):
    """The check passes a whole file: restoring the weights makes the same folder load."""
    folder = shutil.copytree(saved[f"{kind}_cut"], tmp_path / kind)
    with pytest.raises(DamagedAdapterError):
        PeftModel.from_pretrained(_llama(), folder)
    shutil.copyfile(saved[kind] / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    loaded = PeftModel.from_pretrained(_llama(), folder)
    expected = PeftModel.from_pretrained(_llama(), saved[kind])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, expected(input_ids=_ids()).logits)
