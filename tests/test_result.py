import dataclasses
import json
import sys

import pytest
import torch
from conftest import make_tiny

from mi_peft import _io as io_mod
from mi_peft.arch import spec_for
from mi_peft.components import ComponentSet, Head, Neuron
from mi_peft.fingerprint import FingerprintMismatchError
from mi_peft.locate.result import LocalizationResult, count_parameters


def scored(model, seed=0, kinds=("heads", "neurons", "residual"), **kwargs):
    spec = spec_for(model)
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "heads": (spec.n_layers, spec.n_heads),
        "neurons": (spec.n_layers, spec.n_neurons),
        "residual": (spec.n_layers,),
    }
    scores = {k: torch.randn(shapes[k], generator=gen) for k in kinds}
    return LocalizationResult.from_model(model, scores, method="test", metric="logit_diff", **kwargs)


def reference_greedy(result, budget, head_mode, neuron_mode, kinds=("heads", "neurons")):
    """Plain sequential greedy over the documented ranking, checked with ComponentSet.num_parameters."""
    items = []
    for order, kind in enumerate(kinds):
        s = result.scores[kind]
        mx = s.abs().nan_to_num(-1).max()
        for layer in range(s.shape[0]):
            for i in range(s.shape[1]):
                if not torch.isnan(s[layer, i]):
                    comp = Head(layer, i) if kind == "heads" else Neuron(layer, i)
                    items.append((-(s[layer, i].abs() / mx).item(), order, layer * s.shape[1] + i, comp))
    items.sort(key=lambda t: t[:3])
    chosen = []
    for *_, comp in items:
        trial = ComponentSet.from_components([*chosen, comp], spec=result.spec)
        if trial.num_parameters(head_mode, neuron_mode) <= budget:
            chosen.append(comp)
    return ComponentSet.from_components(chosen, spec=result.spec)


def all_components(spec):
    return [Head(li, h) for li in range(spec.n_layers) for h in range(spec.n_heads)] + [
        Neuron(li, n) for li in range(spec.n_layers) for n in range(spec.n_neurons)
    ]


def test_validation():
    model = make_tiny("llama")
    spec = spec_for(model)
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*needs \(2, 4\)"):
        LocalizationResult({"heads": torch.zeros(3, 4)}, spec, "m")
    with pytest.raises(ValueError, match="kinds among"):
        LocalizationResult({"attention": torch.zeros(2, 4)}, spec, "m")
    with pytest.raises(ValueError, match="infinite"):
        LocalizationResult({"residual": torch.tensor([1.0, float("inf")])}, spec, "m")
    with pytest.raises(ValueError, match="all NaN"):
        LocalizationResult({"residual": torch.full((2,), float("nan"))}, spec, "m")
    with pytest.raises(ValueError, match="JSON"):
        LocalizationResult({"residual": torch.ones(2)}, spec, "m", extra={"x": object()})
    with pytest.raises(ValueError, match="bound ArchSpec"):
        LocalizationResult({"residual": torch.ones(2)}, dataclasses.replace(spec, n_layers=0), "m")
    ok = LocalizationResult({"residual": torch.tensor([1.0, float("nan")], dtype=torch.float64)}, spec, "m")
    assert ok.scores["residual"].dtype == torch.float32 and ok.top("residual", 5) == [((0,), 1.0)]
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_top_k_single_and_across_kinds():
    model = make_tiny("llama")
    result = scored(model)
    flat = result.scores["heads"].flatten()
    best = flat.abs().topk(3).indices.tolist()
    assert (
        result.select(top_k=3, kinds=("heads",)).heads
        == ComponentSet.from_components([Head(i // 4, i % 4) for i in best]).heads
    )
    assert result.top("heads", 3) == [((i // 4, i % 4), float(flat[i])) for i in best]
    # across kinds, scores are normalised per kind: heads on a tiny scale still compete
    result.scores["heads"] *= 1e-3
    picked = result.select(top_k=2)
    assert picked.n_heads == 1 and picked.n_neurons == 1
    per_kind = result.select(top_k={"heads": 2, "neurons": 5})
    assert (per_kind.n_heads, per_kind.n_neurons) == (2, 5)
    assert result.select(top_k=1000).n_heads == 8  # capped at what is scored
    assert result.select(top_k=3, kinds=("heads",)).spec == spec_for(model)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "gpt_neox", "gemma2"])
@pytest.mark.parametrize(
    "modes", [("out", "out"), ("qkvo", "out"), ("bias", "in_out"), ("scale", "scale"), ("qkvo", "in_out")]
)
def test_param_budget_exact_closest_and_matches_reference(model_type, modes):
    model = make_tiny(model_type)
    result = scored(model, seed=3)
    head_mode, neuron_mode = modes
    for budget in (700, 2500, 5000):
        cs = result.select(param_budget=budget, head_mode=head_mode, neuron_mode=neuron_mode)
        used = cs.num_parameters(head_mode, neuron_mode)
        assert used <= budget
        chosen = list(cs)  # Head and Neuron are NamedTuples: compare them with their type, not in a set
        keys = {(type(c), *c) for c in chosen}
        for comp in all_components(result.spec):
            if (type(comp), *comp) not in keys:  # nothing left out would still fit
                grown = ComponentSet.from_components([*chosen, comp], spec=result.spec)
                assert grown.num_parameters(head_mode, neuron_mode) > budget
        assert cs == reference_greedy(result, budget, head_mode, neuron_mode)


def test_param_budget_fraction_and_mode_shorthand():
    model = make_tiny("llama")
    result = scored(model)
    total = result.n_model_parameters
    cs = result.select(param_budget=0.1, mode="out")
    assert cs == result.select(param_budget=int(0.1 * total))
    assert cs.num_parameters() <= int(0.1 * total)
    qkvo = result.select(param_budget=0.1, mode="qkvo", kinds=("heads",))
    assert qkvo == result.select(param_budget=0.1, head_mode="qkvo", kinds=("heads",))
    in_out = result.select(param_budget=0.1, mode="in_out", kinds=("neurons",))
    assert in_out.n_neurons == int(0.1 * total) // (3 * 32)


def test_qkvo_counts_shared_kv_rows_once():
    model = make_tiny("llama")  # 4 heads, 2 kv heads: heads 0,1 share kv 0; per = 32 * 8 = 256
    spec = spec_for(model)
    heads = torch.zeros(2, 4)
    heads[0] = torch.tensor([4.0, 3.0, 0.5, 0.25])
    result = LocalizationResult({"heads": heads}, spec, "m")
    both = result.select(param_budget=6 * 256, mode="qkvo")  # 4*256 for head 0, + 2*256 for head 1
    assert both.heads == {0: [0, 1]} and both.num_parameters("qkvo") == 6 * 256
    heads[0] = torch.tensor([4.0, 1.0, 3.0, 0.25])  # head 2 (kv 1) ranks second but no longer fits
    result = LocalizationResult({"heads": heads}, spec, "m")
    skipped = result.select(param_budget=6 * 256, mode="qkvo")
    assert skipped.heads == {0: [0, 1]}


def test_threshold_and_nan_entries():
    model = make_tiny("llama")
    result = scored(model)
    cs = result.select(threshold=1.0, kinds=("neurons",))
    expected = {Neuron(int(i) // 48, int(i) % 48) for i in (result.scores["neurons"].flatten().abs() >= 1.0).nonzero()}
    assert cs.neurons == ComponentSet.from_components(expected).neurons and cs.n_heads == 0
    per_kind = result.select(threshold={"heads": 0.0})
    assert per_kind.n_heads == 8 and per_kind.n_neurons == 0
    heads = result.scores["heads"].clone()
    heads[1] = float("nan")
    partial = LocalizationResult({"heads": heads}, result.spec, "m")
    assert partial.select(top_k=8).heads == {0: [0, 1, 2, 3]}
    assert partial.select(param_budget=10**6).n_heads == 4


def test_random_control_is_reproducible_and_same_size():
    model = make_tiny("llama")
    result = scored(model)
    base = result.select(param_budget=2000)
    a = result.select(param_budget=2000, random=7)
    b = result.select(param_budget=2000, random=7)
    c = result.select(param_budget=2000, random=8)
    assert a == b and a != c
    assert (a.n_heads, a.n_neurons) == (base.n_heads, base.n_neurons)
    assert a.num_parameters() == base.num_parameters()
    assert result.select(top_k=5, random=1).n_heads + result.select(top_k=5, random=1).n_neurons == 5


def test_layers_restrict_ranking_budget_and_random_pool():
    """`layers` selects as if the other layers were unscored, and the random control draws from the same layers."""
    result = scored(make_tiny("llama"))
    masked = {k: v.clone() for k, v in result.scores.items() if k != "residual"}
    for scores in masked.values():
        scores[0] = float("nan")
    outside_removed = LocalizationResult(masked, result.spec, "m", n_model_parameters=result.n_model_parameters)
    for criterion in ({"param_budget": 2000}, {"top_k": 7}, {"threshold": 0.5}):
        restricted = result.select(layers=[1], **criterion)
        assert restricted == outside_removed.select(**criterion)
        assert set(restricted.heads) | set(restricted.neurons) == {1}
    assert result.select(param_budget=2000) != result.select(param_budget=2000, layers=[1])  # layer 0 competes
    located = result.select(param_budget=2000, layers=[1])
    for seed in range(5):
        control = result.select(param_budget=2000, layers=[1], random=seed)
        assert set(control.heads) | set(control.neurons) == {1}
        assert (control.n_heads, control.n_neurons) == (located.n_heads, located.n_neurons)
    assert result.select(top_k=3, layers=range(2)) == result.select(top_k=3)
    for bad, message in (([2], "layer index 2 is out of range"), ([-1], "index -1"), ([], "`layers` is empty")):
        with pytest.raises(ValueError, match=message):
            result.select(top_k=3, layers=bad)
    with pytest.raises(ValueError, match="SAE latents live at one site"):
        result.select(top_k=3, kinds=("sae",), layers=[1])


def test_select_errors():
    model = make_tiny("llama")
    result = scored(model)
    with pytest.raises(ValueError, match="exactly one of"):
        result.select()
    with pytest.raises(ValueError, match=r"exactly one of.*top_k.*threshold"):
        result.select(top_k=3, threshold=0.1)
    with pytest.raises(ValueError, match="residual layers are not adapter components"):
        result.select(top_k=3, kinds=("residual",))
    with pytest.raises(ValueError, match="`mode` must be one of"):
        result.select(top_k=3, mode="lora")
    with pytest.raises(ValueError, match="selects nothing.*cheapest component costs 32.*larger budget"):
        result.select(param_budget=31)
    with pytest.raises(ValueError, match="selects nothing"):
        result.select(threshold=100.0)
    with pytest.raises(ValueError, match="`top_k` must be a positive integer"):
        result.select(top_k=0)
    with pytest.raises(ValueError, match="must be whole"):
        result.select(param_budget=1.5)
    with pytest.raises(ValueError, match="fraction in"):
        result.select(param_budget=True)
    with pytest.raises(ValueError, match="`random` is a seed"):
        result.select(top_k=2, random="a")
    no_total = LocalizationResult(result.scores, result.spec, "m")
    with pytest.raises(ValueError, match="needs `n_model_parameters`"):
        no_total.select(param_budget=0.01)
    heads_only = LocalizationResult({"heads": result.scores["heads"]}, result.spec, "m")
    assert heads_only.select(top_k=2).n_heads == 2  # default kinds skip the missing neurons
    with pytest.raises(ValueError, match="no scores for kinds"):
        heads_only.select(top_k=2, kinds=("neurons",))


def test_save_load_round_trip_and_fingerprint(tmp_path):
    model = make_tiny("gpt_neox")
    result = scored(model, data_hash="abc", extra={"positions": "last", "n_pairs": 4})
    result.scores["heads"][0, 1] = float("nan")
    result.save(tmp_path / "res")
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["result.json", "scores.safetensors"]
    loaded = LocalizationResult.load(tmp_path / "res", model=model)
    for kind in result.kinds:
        assert torch.equal(loaded.scores[kind].nan_to_num(7.0), result.scores[kind].nan_to_num(7.0))
    assert loaded.spec == result.spec and loaded.extra == result.extra and loaded.created == result.created
    assert (loaded.method, loaded.metric, loaded.data_hash) == ("test", "logit_diff", "abc")
    assert loaded.n_model_parameters == result.n_model_parameters
    assert loaded.select(top_k=4) == result.select(top_k=4)
    other = make_tiny("gpt_neox", seed=1)
    with pytest.raises(FingerprintMismatchError, match="different base model"):
        LocalizationResult.load(tmp_path / "res", model=other)
    assert LocalizationResult.load(tmp_path / "res", model=other, ignore_fingerprint=True).kinds == result.kinds
    result.scores["residual"] += 1
    result.save(tmp_path / "res")  # overwrite
    assert torch.equal(LocalizationResult.load(tmp_path / "res").scores["residual"], result.scores["residual"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LocalizationResult.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "result.json").write_text(json.dumps({"format": "mi_peft.LocalizationResult"}))
    with pytest.raises(FileNotFoundError, match="scores.safetensors"):
        LocalizationResult.load(tmp_path / "half")
    result = scored(make_tiny("llama"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        result.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_save_is_atomic(tmp_path, monkeypatch):
    result = scored(make_tiny("llama"))

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io_mod, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "res")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder
    monkeypatch.undo()
    result.save(tmp_path / "res")
    before = LocalizationResult.load(tmp_path / "res").scores["heads"].clone()
    monkeypatch.setattr(io_mod, "save_file", broken_save_file)
    result.scores["heads"] += 1
    with pytest.raises(OSError):
        result.save(tmp_path / "res")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]
    assert torch.equal(LocalizationResult.load(tmp_path / "res").scores["heads"], before)


def test_to_frame_with_and_without_pandas(monkeypatch):
    result = scored(make_tiny("llama"))
    result.scores["residual"][1] = float("nan")
    frame = result.to_frame()
    assert list(frame.columns) == ["kind", "layer", "index", "score", "rank"]
    assert len(frame) == 8 + 96 + 2
    first = frame[frame.kind == "neurons"].iloc[0]
    (layer, index), score = result.top("neurons", 1)[0]
    assert (first.layer, first["index"], first["rank"]) == (layer, index, 0) and first.score == pytest.approx(score)
    residual = frame[frame.kind == "residual"]
    assert residual["index"].isna().all() and residual["rank"].isna().tolist() == [False, True]
    monkeypatch.setitem(sys.modules, "pandas", None)
    rows = result.to_frame()
    assert isinstance(rows, list) and len(rows) == len(frame)
    assert rows[0] == {
        "kind": "heads",
        "layer": frame.layer[0],
        "index": frame["index"][0],
        "score": frame.score[0],
        "rank": 0,
    }


def test_plot_writes_pngs(tmp_path):
    result = scored(make_tiny("qwen3"))
    paths = result.plot(tmp_path / "plots", top_n=10)
    assert [p.name for p in paths] == ["heads.png", "neurons.png", "residual.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="pass a folder"):
        result.plot(paths[0])


def test_compare():
    model = make_tiny("llama")
    result = scored(model)
    # 8 heads ranked 1..8; the other result swaps ranks 1<->2, 5<->6 and 7<->8:
    # sum of squared rank differences = 6, spearman = 1 - 6 * 6 / (8 * 63) = 13/14;
    # top-3 {8, 7, 6} vs {8, 7, 5} share 2 heads.
    ranks = torch.arange(1.0, 9.0)
    swapped = torch.tensor([2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 8.0, 7.0])
    mine = LocalizationResult({"heads": ranks.reshape(2, 4)}, result.spec, "mine")
    theirs = LocalizationResult({"heads": swapped.reshape(2, 4)}, result.spec, "theirs")
    cmp = mine.compare(theirs, k=3)["heads"]
    assert cmp["spearman"] == pytest.approx(13 / 14) and cmp["spearman_signed"] == pytest.approx(13 / 14)
    assert cmp["overlap"] == 2 and cmp["overlap_fraction"] == pytest.approx(2 / 3) and cmp["k"] == 3
    copy = LocalizationResult({k: v.clone() for k, v in result.scores.items()}, result.spec, "copy")
    same = result.compare(copy, k=5)
    assert same["heads"]["spearman"] == pytest.approx(1.0) and same["neurons"]["overlap"] == 5
    positive = {k: v.abs() + 0.1 for k, v in result.scores.items()}
    reversed_scores = {k: v.max() + v.min() - v for k, v in positive.items()}
    a = LocalizationResult(positive, result.spec, "a")
    b = LocalizationResult(reversed_scores, result.spec, "b")
    cmp = a.compare(b, k=3)
    assert cmp["neurons"]["spearman"] == pytest.approx(-1.0) and cmp["neurons"]["spearman_signed"] == pytest.approx(
        -1.0
    )
    assert cmp["neurons"]["overlap"] == 0 and cmp["heads"]["overlap"] == 0
    flipped = LocalizationResult({k: -v for k, v in result.scores.items()}, result.spec, "c")
    cmp = result.compare(flipped)
    assert cmp["heads"]["spearman"] == pytest.approx(1.0) and cmp["heads"]["spearman_signed"] == pytest.approx(-1.0)
    ties = LocalizationResult({"residual": torch.tensor([1.0, 1.0])}, result.spec, "t")
    assert ties.compare(ties)["residual"]["spearman"] != ties.compare(ties)["residual"]["spearman"]  # NaN: constant
    with pytest.raises(ValueError, match="differ in shape"):
        result.compare(scored(make_tiny("gpt2")))
    with pytest.raises(TypeError, match="LocalizationResult"):
        result.compare({"heads": 1})
    with pytest.raises(ValueError, match="no common score kinds"):
        LocalizationResult({"heads": result.scores["heads"]}, result.spec, "h").compare(ties)


@pytest.mark.slow
def test_embedded_param_budget(embedded):
    model, _ = embedded
    spec = spec_for(model)
    gen = torch.Generator().manual_seed(0)
    scores = {"heads": torch.randn(30, 9, generator=gen), "neurons": torch.randn(30, 1536, generator=gen)}
    result = LocalizationResult(scores, spec, "random", n_model_parameters=count_parameters(model))
    assert result.n_model_parameters == 134_515_008
    budget = int(0.001 * 134_515_008)
    cs = result.select(param_budget=0.001, mode="out")
    used = cs.num_parameters("out", "out")
    assert used <= budget and budget - used < 576  # within one neuron (the cheapest component)
    assert used / 134_515_008 <= 0.001
