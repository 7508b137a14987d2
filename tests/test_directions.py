import math

import pytest
import torch
from conftest import make_tiny
from test_lens import word_tokenizer

from mi_peft import capture
from mi_peft.arch import spec_for
from mi_peft.data import ContrastivePairs
from mi_peft.fingerprint import FingerprintMismatchError
from mi_peft.locate.directions import Directions, directions

POS_MARK, NEG_MARK = 5, 6


class MarkedPairs:
    """Left-padded pairs (the ContrastivePairs.batches contract) that differ only in their first token."""

    def __init__(self, n: int = 12, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.rows = [
            torch.randint(10, 90, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen) for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def data_hash(self) -> str:
        return "marked"

    def _batch(self, rows, mark):
        width = max(len(r) for r in rows) + 1
        ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            seq = torch.cat([torch.tensor([mark]), r])
            ids[i, width - len(seq) :], mask[i, width - len(seq) :] = seq, 1
        return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    def batches(self, tokenizer, batch_size=8, chat=None, max_length=None):
        for start in range(0, len(self), batch_size):
            rows = self.rows[start : start + batch_size]
            yield self._batch(rows, POS_MARK), self._batch(rows, NEG_MARK)


def planted(model, vector, layer=0):
    """Add ``vector`` to the residual stream of ``layer`` on rows whose first real token is the positive mark."""
    seen = {}

    def remember(_module, _args, kwargs):
        first = kwargs["attention_mask"].argmax(-1, keepdim=True)  # left padding: first real token
        seen["positive"] = kwargs["input_ids"].gather(1, first)[..., None] == POS_MARK

    handle = model.register_forward_pre_hook(remember, with_kwargs=True)
    return handle, capture.edit(model, residual={layer: lambda x: x + vector * seen["positive"]})


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("method", ["mean_diff", "pca", "probe"])
def test_planted_direction_is_recovered(model_type, method):
    model = make_tiny(model_type)
    d_model = spec_for(model).d_model
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(1))
    v = 50.0 * v / v.norm()  # well above the natural difference (about 3 in tiny gemma2/3, whose norms amplify it)
    handle, edit = planted(model, v)
    try:
        with edit:
            dirs = directions(model, None, MarkedPairs(), method=method, batch_size=5, progress=False)
    finally:
        handle.remove()
    assert dirs.layers == [0, 1] and dirs.method == method and dirs.model_type == model_type
    assert cosine(dirs[0], v) > 0.99
    assert dirs[0].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert dirs.norms[0] == pytest.approx(50.0, rel=0.1)  # the mean projection gap along the direction
    assert dirs.extra["n_pairs"] == 12 and dirs.extra["data_hash"] == "marked"


def test_mean_diff_norm_is_norm_of_mean_difference():
    model = make_tiny("llama")
    pairs = MarkedPairs(n=4)
    ((pos, neg),) = list(pairs.batches(None, batch_size=4))
    with capture.record(model, residual=[1], attention_mask=pos["attention_mask"]) as a, torch.no_grad():
        model(**pos)
    with capture.record(model, residual=[1], attention_mask=neg["attention_mask"]) as b, torch.no_grad():
        model(**neg)
    diff = a.residual[1].mean(0) - b.residual[1].mean(0)
    dirs = directions(model, None, pairs, layers=[1], progress=False)
    assert dirs.layers == [1] and dirs.norms[1] == pytest.approx(float(diff.norm()), rel=1e-5)
    assert torch.allclose(dirs.raw(1), diff, atol=1e-6)
    pca = directions(model, None, pairs, method="pca", layers=[1], progress=False)
    assert 0 < pca.extra["explained_variance"]["1"] <= 1
    assert (pca.raw(1) @ diff).item() > 0  # oriented so that positives project higher
    mean = directions(model, None, pairs, layers=[1], positions="mean", progress=False)
    assert mean.extra["positions"] == "mean" and not torch.allclose(mean[1], dirs[1])


def test_with_contrastive_pairs_and_tokenizer():
    model = make_tiny("qwen2")
    pairs = ContrastivePairs(
        positive=["the cat is a cat", "Paris is the capital"], negative=["the dog", "France is a dog"]
    )
    dirs = directions(model, word_tokenizer(), pairs, method="probe", batch_size=1, progress=False)
    assert dirs.layers == [0, 1] and dirs.extra["probe_accuracy"]["0"] == 1.0
    assert dirs.extra["data_hash"] == pairs.data_hash()


def test_save_load_exact(tmp_path):
    model = make_tiny("llama")
    dirs = directions(model, None, MarkedPairs(), method="pca", progress=False)
    dirs.save(tmp_path / "dirs")
    loaded = Directions.load(tmp_path / "dirs", model=model)
    assert loaded.layers == dirs.layers and loaded.norms == dirs.norms and loaded.extra == dirs.extra
    assert all(torch.equal(loaded[layer], dirs[layer]) for layer in dirs.layers)
    assert (loaded.method, loaded.model_type, loaded.model_fingerprint) == ("pca", "llama", dirs.model_fingerprint)
    with pytest.raises(FingerprintMismatchError):
        Directions.load(tmp_path / "dirs", model=make_tiny("llama", seed=1))
    with pytest.raises(ValueError, match="not this gpt2 model"):
        Directions.load(tmp_path / "dirs", model=make_tiny("gpt2"))
    with pytest.raises(FileNotFoundError, match="missing"):
        Directions.load(tmp_path / "missing")
    (2 * dirs).save(tmp_path / "dirs")  # overwrite
    assert Directions.load(tmp_path / "dirs").norms[0] == pytest.approx(2 * dirs.norms[0])


def test_arithmetic():
    gen = torch.Generator().manual_seed(0)
    a = Directions.from_raw({0: torch.randn(8, generator=gen), 3: torch.randn(8, generator=gen)}, "mean_diff", "llama")
    b = Directions.from_raw({0: torch.randn(8, generator=gen), 3: torch.randn(8, generator=gen)}, "pca", "llama")
    total = a + b
    assert torch.allclose(total.raw(3), a.raw(3) + b.raw(3), atol=1e-6) and total.method == "mean_diff+pca"
    assert torch.allclose((a - b).raw(0), a.raw(0) - b.raw(0), atol=1e-6)
    double = 2 * a
    assert torch.equal(double[0], a[0]) and double.norms[0] == pytest.approx(2 * a.norms[0])
    assert torch.equal((a * 2)[3], a[3]) and (a / 4).norms[3] == pytest.approx(a.norms[3] / 4)
    assert torch.equal((-a)[0], -a[0]) and (-a).norms == a.norms
    assert torch.equal((a * -0.5)[0], -a[0])
    with pytest.raises(TypeError, match="'Directions' and 'int'"):
        a + 1
    with pytest.raises(TypeError, match="'Directions' and 'Directions'"):
        a * b
    with pytest.raises(TypeError, match="'Directions' and 'str'"):
        a / "x"
    with pytest.raises(ValueError, match="zero"):
        a - a
    with pytest.raises(ValueError, match="layers"):
        a + Directions.from_raw({0: torch.ones(8)}, "mean_diff", "llama")
    with pytest.raises(ValueError, match="zero or non-finite"):
        a * 0
    with pytest.raises(ZeroDivisionError):
        a / 0


def test_validation_and_errors():
    with pytest.raises(ValueError, match="NaN"):
        Directions.from_raw({0: torch.tensor([1.0, math.nan])}, "m", "llama")
    with pytest.raises(ValueError, match="zero"):
        Directions.from_raw({0: torch.zeros(4)}, "m", "llama")
    with pytest.raises(ValueError, match="not 1.*from_raw"):
        Directions({0: torch.ones(4)}, {0: 1.0}, "m", "llama")
    with pytest.raises(ValueError, match="must match"):
        Directions({0: torch.tensor([1.0, 0.0])}, {1: 1.0}, "m", "llama")
    with pytest.raises(ValueError, match="norms\\[0\\] must be a finite number > 0"):
        Directions({0: torch.tensor([1.0, 0.0])}, {0: -1.0}, "m", "llama")
    model = make_tiny("llama")
    pairs = MarkedPairs(n=2)
    with pytest.raises(ValueError, match="`method` must be one of"):
        directions(model, None, pairs, method="umap")
    with pytest.raises(ValueError, match="'last' or 'mean'"):
        directions(model, None, pairs, positions="all")
    with pytest.raises(ValueError, match="layer index 5 is out of range"):
        directions(model, None, pairs, layers=[5])
    with pytest.raises(ValueError, match="`layers` is empty"):
        directions(model, None, pairs, layers=[])
    with pytest.raises(ValueError, match="probe needs at least 2 pairs"):
        directions(model, None, MarkedPairs(n=1), method="probe")
    with pytest.raises(ValueError, match="do not differ"):
        directions(model, None, SamePairs(), progress=False)


class SamePairs(MarkedPairs):
    def batches(self, tokenizer, batch_size=8, chat=None, max_length=None):
        for pos, _ in super().batches(tokenizer, batch_size):
            yield pos, dict(pos)
