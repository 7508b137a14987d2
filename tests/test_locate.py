"""locate(): every method finds a planted component; batched patching is exact; state is restored."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import make_tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mi_peft import capture
from mi_peft.arch import spec_for
from mi_peft.data import ContrastivePairs
from mi_peft.fingerprint import model_fingerprint
from mi_peft.locate import METHODS, LocalizationResult, locate
from mi_peft.locate.causal import ablation, activation_patching
from mi_peft.locate.gradient import attribution_patching

X, Y, T = 5, 6, 7  # marker on positive prompts, its twin on negative ones, token read by the metric
LAYER, INDEX = 1, 2  # the planted head / neuron


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def make_pairs(n: int = 12, seed: int = 0) -> ContrastivePairs:
    """Random prompts of different lengths ending in the marker (positive) or its twin (negative)."""
    rng = random.Random(seed)
    stems = [" ".join(f"w{rng.randrange(10, 90)}" for _ in range(rng.randrange(3, 7))) for _ in range(n)]
    return ContrastivePairs([f"{s} w{X}" for s in stems], [f"{s} w{Y}" for s in stems])


def target_logit(logits, batch):
    return logits[:, -1, T] - logits[:, -1].mean(-1)


def twin_model(model_type: str = "llama"):
    """A tiny model to which the marker X and its twin Y are the same input (equal embedding rows)."""
    model = make_tiny(model_type)
    with torch.no_grad():
        model.get_input_embeddings().weight[Y] = model.get_input_embeddings().weight[X]
    return model


def plant(model, kind: str) -> list:
    """Add a fixed delta to one head (or neuron) at marker tokens: the ONLY difference between the two sides.

    The delta points along the metric's gradient at that component, so that it also moves the metric. A
    neuron's gate is also shut at the marker, so that it fires on one side only (what LAPE counts).
    """
    spec, tok = spec_for(model), tiny_tokenizer()
    batch = next(make_pairs().batches(tok, batch_size=12))[1]
    with capture.record(model, **{kind: [LAYER]}, attention_mask=batch["attention_mask"], detach=False) as cache:
        value = target_logit(model(**batch).logits, batch).sum()
        grad = torch.autograd.grad(value, cache[kind][LAYER])[0][:, INDEX].mean(0)
    delta = torch.zeros(spec.n_heads * spec.head_dim if kind == "heads" else spec.n_neurons)
    if kind == "heads":
        delta[INDEX * spec.head_dim : (INDEX + 1) * spec.head_dim] = 3.0 * grad / grad.norm()
    else:
        delta[INDEX] = 3.0 * grad.sign()
    state = {}

    def grab_ids(_module, _args, kwargs):
        state["ids"] = kwargs["input_ids"]

    def add_delta(_module, args):
        marker = (state["ids"] == X).to(args[0].dtype)[..., None]
        return (args[0] + marker * delta,)

    def close_gate(_module, _args, output):  # LAPE counts firing at the gate: shut it at the marker
        shut = torch.zeros(output.shape[-1])
        shut[INDEX] = 20.0
        return output - (state["ids"] == X).to(output.dtype)[..., None] * shut

    site = spec.attn_out_module(model, LAYER) if kind == "heads" else spec.mlp_out_module(model, LAYER)
    handles = [model.register_forward_pre_hook(grab_ids, with_kwargs=True), site.register_forward_pre_hook(add_delta)]
    if kind == "neurons":
        handles.append(spec.layer_module(model, LAYER, spec.mlp_in[0]).register_forward_hook(close_gate))
    return handles


@pytest.fixture(scope="module", params=["heads", "neurons"])
def planted(request):
    model = twin_model()
    handles = plant(model, request.param)
    yield model, request.param
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize(
    "method, options",
    [(m, {}) for m in METHODS] + [("ablation", {"mode": "mean"}), ("activation_stats", {"stat": "abs_diff"})],
)
def test_every_method_ranks_the_planted_component_first(planted, method, options):
    model, kind = planted
    if METHODS[method][1]:  # the method needs a metric
        options = {**options, "metric": target_logit}
    result = locate(
        model, tiny_tokenizer(), make_pairs(), method, components=kind, batch_size=4, progress=False, **options
    )
    scores = result.scores[kind].abs()
    assert scores.argmax() == LAYER * scores.shape[1] + INDEX, scores
    others = scores.flatten()[torch.arange(scores.numel()) != LAYER * scores.shape[1] + INDEX]
    chance = 0.5 if method == "probe" else 0.0  # probe scores are accuracies
    assert scores[LAYER, INDEX] - chance > 3 * (others.max() - chance)


def _pair_batches(model_type: str):
    """Six pairs of unrelated prompts (3 per batch) and a tiny model."""
    rng = random.Random(1)
    texts = [" ".join(f"w{rng.randrange(10, 90)}" for _ in range(rng.randrange(3, 7))) for _ in range(12)]
    pairs = ContrastivePairs(texts[:6], texts[6:])
    return list(pairs.batches(tiny_tokenizer(), batch_size=3)), make_tiny(model_type)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["last", [-2, -1]])
def test_batched_patching_equals_one_component_per_forward(model_type, positions):
    batches, model = _pair_batches(model_type)
    spec = spec_for(model)
    kw = dict(metric=target_logit, positions=positions)
    batched, _ = activation_patching(model, batches, max_batch=10_000, **kw)
    single, _ = activation_patching(model, batches, max_batch=1, components=("heads", "residual"), **kw)
    full_runs, _ = activation_patching(model, batches, max_batch=7, reuse_prefix=False, **kw)
    for kind in batched:
        torch.testing.assert_close(batched[kind], full_runs[kind], atol=1e-6, rtol=0)
        if kind in single:
            torch.testing.assert_close(batched[kind], single[kind], atol=1e-6, rtol=0)
    manual = torch.zeros(spec.n_layers, spec.n_heads)
    with torch.no_grad():
        for pos, neg in batches:
            with capture.record(model, heads=True, positions=positions, attention_mask=pos["attention_mask"]) as cache:
                model(**pos)
            clean = target_logit(model(**neg).logits, neg)
            for layer in range(spec.n_layers):
                for head in range(spec.n_heads):
                    with capture.patch(model, cache, heads={layer: [head]}, attention_mask=neg["attention_mask"]):
                        manual[layer, head] += (target_logit(model(**neg).logits, neg) - clean).sum()
    torch.testing.assert_close(batched["heads"], manual / 6, atol=1e-6, rtol=0)
    assert batched["heads"].abs().max() > 1e-3


def test_batched_zero_ablation_equals_capture_ablate():
    batches, model = _pair_batches("llama")
    spec = spec_for(model)
    scores, _ = ablation(model, batches, metric=target_logit, components=("heads",), max_batch=10_000)
    manual = torch.zeros(spec.n_layers, spec.n_heads)
    with torch.no_grad():
        for pos, _ in batches:
            clean = target_logit(model(**pos).logits, pos)
            for layer in range(spec.n_layers):
                for head in range(spec.n_heads):
                    mask = pos["attention_mask"]
                    with capture.ablate(model, heads={layer: [head]}, positions="last", attention_mask=mask):
                        manual[layer, head] += (target_logit(model(**pos).logits, pos) - clean).sum()
    torch.testing.assert_close(scores["heads"], manual / 6, atol=1e-6, rtol=0)


def test_neuron_sample_scores_a_seeded_subset_and_leaves_the_rest_nan():
    batches, model = _pair_batches("llama")
    full, _ = activation_patching(model, batches, metric=target_logit, components=("neurons",))
    part, extra = activation_patching(model, batches, metric=target_logit, components=("neurons",), neuron_sample=20)
    scored = ~part["neurons"].isnan()
    assert int(scored.sum()) == 20 and extra["neuron_sample"]["n"] == 20
    torch.testing.assert_close(part["neurons"][scored], full["neurons"][scored], atol=1e-6, rtol=0)
    again, _ = activation_patching(model, batches, metric=target_logit, components=("neurons",), neuron_sample=20)
    assert torch.equal(again["neurons"].isnan(), part["neurons"].isnan())


def test_result_records_method_metric_model_and_data():
    model, tok, pairs = twin_model(), tiny_tokenizer(), make_pairs()
    result = locate(model, tok, pairs, method="attribution_patching", metric=target_logit, batch_size=5, progress=False)
    assert isinstance(result, LocalizationResult)
    spec = spec_for(model)
    assert result.scores["heads"].shape == (spec.n_layers, spec.n_heads)
    assert result.scores["neurons"].shape == (spec.n_layers, spec.n_neurons)
    assert result.scores["residual"].shape == (spec.n_layers,)
    assert result.method == "attribution_patching" and result.metric == "target_logit"
    assert result.model_fingerprint == model_fingerprint(model) and result.data_hash == pairs.data_hash()
    assert result.extra["n_pairs"] == 12 and result.extra["positions"] == "last" and result.extra["batch_size"] == 5


def test_recorded_metric_means_match_a_direct_forward_pass():
    """metric_positive / metric_negative are the mean metric on each side, not each other's copy."""
    model, tok, pairs = make_tiny("llama"), tiny_tokenizer(), make_pairs()
    result = locate(model, tok, pairs, method="attribution_patching", metric=target_logit, batch_size=5, progress=False)
    sums = [0.0, 0.0]
    with torch.no_grad():
        for pos, neg in pairs.batches(tok, batch_size=12):
            sums[0] += float(target_logit(model(**pos).logits, pos).sum())
            sums[1] += float(target_logit(model(**neg).logits, neg).sum())
    expected_positive, expected_negative = sums[0] / len(pairs), sums[1] / len(pairs)
    assert abs(expected_positive - expected_negative) > 1e-3  # the two sides really differ here
    assert result.extra["metric_positive"] == pytest.approx(expected_positive, abs=1e-5)
    assert result.extra["metric_negative"] == pytest.approx(expected_negative, abs=1e-5)


def test_lape_accepts_several_classes():
    model, tok = twin_model(), tiny_tokenizer()
    rng = random.Random(3)
    classes = {name: [f"w{rng.randrange(10, 90)} w{rng.randrange(10, 90)}" for _ in range(4)] for name in "abc"}
    result = locate(
        model, tok, classes, method="lape", components=("neurons", "heads"), positions="all", progress=False
    )
    assert result.extra["classes"] == ["a", "b", "c"]
    for kind in ("neurons", "heads"):
        assert ((result.scores[kind] >= 0) & (result.scores[kind] <= 1)).all()
    assert result.scores["neurons"].max() > 0


def _gate_by_hand(model, ids: torch.Tensor) -> torch.Tensor:
    """``[L, T, n_neurons]`` activation-function inputs, from each MLP input projection's input and weights."""
    spec, inputs = spec_for(model), []
    modules = [spec.layer_module(model, layer, spec.mlp_in[0]) for layer in range(spec.n_layers)]
    handles = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0][0])) for m in modules]
    with torch.no_grad():
        model(input_ids=ids[None])
    for h in handles:
        h.remove()
    gates = []
    for m, x in zip(modules, inputs, strict=True):
        weight = m.weight if spec.conv1d else m.weight.T  # [d_model, out]
        out = x @ weight + (m.bias if m.bias is not None else 0)
        gates.append(out[:, : spec.n_neurons])
    return torch.stack(gates)


def test_lape_counts_a_neuron_as_firing_where_its_gate_is_positive(tiny_model):
    """LAPE's p_c is the share of class-c tokens with act(gate) > 0, not the sign of the gated value."""
    tok, rng = tiny_tokenizer(), random.Random(5)
    classes = {
        c: [" ".join(f"w{rng.randrange(10, 90)}" for _ in range(rng.randrange(3, 7))) for _ in range(5)] for c in "ab"
    }
    result = locate(tiny_model, tok, classes, method="lape", components=("neurons",), positions="all", min_prob=0.0)
    p = []
    for prompts in classes.values():
        fired = [(_gate_by_hand(tiny_model, tok(t, return_tensors="pt")["input_ids"][0]) > 0).double() for t in prompts]
        p.append(torch.cat(fired, 1).mean(1).flatten())  # [L * n_neurons], over every token of the class
    p = torch.stack(p)
    q = p / p.sum(0).clamp_min(1e-12)
    expected = (1 + (q * q.clamp_min(1e-12).log()).sum(0) / math.log(2)).clamp_min(0) * torch.sign(p[0] - p[1])
    assert torch.allclose(result.scores["neurons"].flatten().double(), expected, atol=1e-5)
    assert (expected != 0).any()


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["attribution_patching", "grad_x_act", "activation_patching", "probe"])
def test_model_state_is_restored(method):
    model, tok = twin_model(), tiny_tokenizer()
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    locate(model, tok, make_pairs(4), method=method, metric=target_logit, progress=False)
    assert _no_hooks(model) and model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_errors_name_the_bad_value_and_the_fix():
    model, tok, pairs = twin_model(), tiny_tokenizer(), make_pairs(4)
    with pytest.raises(ValueError, match=r"unknown method 'patching'.*activation_patching"):
        locate(model, tok, pairs, method="patching")
    with pytest.raises(ValueError, match=r"unknown: \['attention'\]"):
        locate(model, tok, pairs, components=("heads", "attention"))
    for bad in ((), ("heads", "heads")):
        with pytest.raises(ValueError, match="non-empty, duplicate-free"):
            locate(model, tok, pairs, components=bad)
    with pytest.raises(ValueError, match="empty"):
        locate(model, tok, ContrastivePairs([], []), method="mean_diff")
    with pytest.raises(ValueError, match=r"unknown options \['max_batch'\].*valid options: \['stat'\]"):
        locate(model, tok, pairs, method="activation_stats", max_batch=4)
    with pytest.raises(ValueError, match=r"`positions` must be one of \('last', 'all'\)"):
        locate(model, tok, pairs, method="attribution_patching", positions="mean", metric=target_logit)
    with pytest.raises(ValueError, match="out of range"):
        locate(model, tok, pairs, method="mean_diff", positions=[-40], progress=False)
    with pytest.raises(ValueError, match="only accepted by method='lape'"):
        locate(model, tok, {"a": ["w30"], "b": ["w40"]}, method="mean_diff")
    with pytest.raises(ValueError, match="`max_batch` must be a positive int"):
        locate(model, tok, pairs, method="activation_patching", metric=target_logit, max_batch=0)
    with pytest.raises(ValueError, match="`neuron_sample` must be a positive int"):
        locate(model, tok, pairs, method="activation_patching", metric=target_logit, neuron_sample=0)
    with pytest.raises(ValueError, match="`mode` must be 'zero' or 'mean'"):
        locate(model, tok, pairs, method="ablation", metric=target_logit, mode="resample")
    with pytest.raises(ValueError, match=r"one score per example, shape \(4,\)"):
        locate(model, tok, pairs, method="grad_x_act", metric=lambda logits, batch: logits.sum(), progress=False)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        locate(model, tok, pairs, batch_size=0)
    with pytest.warns(UserWarning, match="uses no metric"):
        locate(model, tok, pairs, method="mean_diff", metric="refusal", progress=False)
    assert _no_hooks(model)


def test_completion_metric_reading_every_position_still_patches_exactly():
    """A metric that reads all positions gets full-length logits (prefix logits reused from the clean run)."""
    batches, model = _pair_batches("llama")

    def mean_logit(logits, batch):
        return (logits[..., T] * batch["attention_mask"]).sum(-1)

    fast, _ = activation_patching(model, batches, metric=mean_logit, components=("heads",))
    slow, _ = activation_patching(model, batches, metric=mean_logit, components=("heads",), reuse_prefix=False)
    torch.testing.assert_close(fast["heads"], slow["heads"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_attribution_patching_on_the_embedded_model(embedded):
    model, tok = embedded
    pairs = ContrastivePairs.load("recipes/data/refusal").subset(4)
    result = locate(model, tok, pairs, method="attribution_patching", batch_size=4, progress=False)
    assert result.metric == "refusal" and result.scores["heads"].shape == (30, 9)
    assert result.scores["neurons"].shape == (30, 1536) and torch.isfinite(result.scores["neurons"]).all()
    assert result.scores["heads"].abs().max() > 0 and _no_hooks(model)


def test_attribution_matches_exact_patching_for_a_small_difference():
    """First-order attribution equals exact patching as the two sides converge (checks signs and positions)."""
    model, tok = twin_model(), tiny_tokenizer()
    torch.manual_seed(0)
    model.get_input_embeddings().weight.data[Y] += 1e-4 * torch.randn(model.config.hidden_size)
    batches = list(make_pairs(6).batches(tok, batch_size=3))
    approx, _ = attribution_patching(model, batches, metric=target_logit)
    exact, _ = activation_patching(model, batches, metric=target_logit)
    for kind in exact:
        scale = exact[kind].abs().max()
        assert scale > 1e-6
        torch.testing.assert_close(approx[kind], exact[kind], atol=0.03 * scale, rtol=0)  # measured: <= 1.2%


def test_patching_the_last_residual_layer_gives_the_whole_effect():
    batches, model = _pair_batches("llama")
    scores, extra = activation_patching(model, batches, metric=target_logit, components=("residual",))
    whole = extra["metric_positive"] - extra["metric_negative"]
    assert abs(float(scores["residual"][-1]) - whole) < 1e-5 and abs(whole) > 1e-3
