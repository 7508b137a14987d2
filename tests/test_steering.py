"""Steering adapter: ops, merge rules, positions with and without KV cache, conditions, save/load, bad input."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny, shared_data
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import mi_peft.tuners.steering  # noqa: F401  (registers the "steering" PEFT method)
from mi_peft import capture
from mi_peft.arch import spec_for
from mi_peft.fingerprint import FingerprintMismatchError
from mi_peft.tuners.steering import SteeringCondition, SteeringConfig, SteeringLayer, calibrate_condition
from mi_peft.tuners.steering.condition import best_threshold, condition_scores, selection_rates
from mi_peft.tuners.steering.layer import POST_NORM_WRITERS

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2"]
MERGEABLE = sorted(set(TINY_CONFIGS) - set(POST_NORM_WRITERS))


def ids_batch(batch: int = 2, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def random_dirs(model, seed: int = 0) -> dict[int, torch.Tensor]:
    spec = spec_for(model)
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(spec.d_model, generator=gen) for layer in range(spec.n_layers)}


def steered(model, directions=None, **kwargs):
    cfg = SteeringConfig.from_directions(random_dirs(model) if directions is None else directions, **kwargs)
    return get_peft_model(copy.deepcopy(model), cfg)


def resid_direction(model, ids, layer: int = 1) -> torch.Tensor:
    """A direction the residual stream strongly carries (its mean), so that ablating it is a real change."""
    with torch.no_grad(), capture.record(model, residual=[layer], positions="all") as cache:
        model(input_ids=ids)
    mean = cache.residual[layer].mean(dim=(0, 1))
    return mean / mean.norm()


def greedy(model, ids, use_cache: bool = True, n: int = 6) -> torch.Tensor:
    return model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0)


# ---- identity, add, clamp ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_trainable_and_identity_at_alpha_zero_and_unit_scales(arch):
    model, ids = make_tiny(arch), ids_batch()
    base = logits(model, ids)
    pm = steered(model, layers=[0, 1], alpha=0.0)
    assert pm.get_nb_trainable_parameters()[0] == 0
    assert torch.equal(logits(pm, ids), base)
    scales = SteeringConfig(head_scales={0: {1: 1.0}}, neuron_scales={1: {3: 1.0, 4: 1.0}})
    assert torch.equal(logits(get_peft_model(copy.deepcopy(model), scales), ids), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_add_equals_manual_residual_hook(arch):
    model, ids = make_tiny(arch), ids_batch()
    dirs, alpha = random_dirs(model), {0: 2.0, 1: -3.0}
    with capture.edit(model, residual={n: (lambda x, v=a * dirs[n] / dirs[n].norm(): x + v) for n, a in alpha.items()}):
        manual = logits(model, ids)
    out = logits(steered(model, dirs, layers=[0, 1], alpha=alpha), ids)
    torch.testing.assert_close(out, manual, atol=1e-6, rtol=0)
    assert (out - logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_clamp_sets_the_projection(arch):
    model, ids = make_tiny(arch), ids_batch()
    dirs = random_dirs(model)
    pm = steered(model, dirs, layers=[0, 1], op="clamp", value=0.7)
    with torch.no_grad(), capture.record(pm, residual=True, positions="all") as cache:
        pm(input_ids=ids)
    for layer in (0, 1):
        proj = cache.residual[layer] @ (dirs[layer] / dirs[layer].norm())
        torch.testing.assert_close(proj, torch.full_like(proj, 0.7), atol=1e-5, rtol=0)


# ---- ablation and scaling: runtime and exact merge -----------------------------------------------


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_ablate_removes_direction_from_every_layer(arch):
    model, ids = make_tiny(arch), ids_batch()
    r = resid_direction(model, ids)
    pm = steered(model, {1: r}, layers=[1], op="ablate")
    with torch.no_grad(), capture.record(pm, residual=True, positions="all") as cache:
        pm(input_ids=ids)
    with torch.no_grad(), capture.record(model, residual=True, positions="all") as base:
        model(input_ids=ids)
    for layer, h in cache.residual.items():
        assert (base.residual[layer] @ r).abs().max() > 1e-2
        assert (h @ r).abs().max() < 1e-4, (arch, layer)


@pytest.mark.parametrize("arch", MERGEABLE)
def test_ablate_merges_exactly(arch):
    model, ids = make_tiny(arch), ids_batch()
    r = resid_direction(model, ids)
    pm = steered(model, {1: r}, layers=[1], op="ablate")
    unmerged = logits(pm, ids)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, SteeringLayer) for m in merged.modules())
    assert not any(m._forward_pre_hooks for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=0)
    with torch.no_grad(), capture.record(merged, residual=True, positions="all") as cache:
        merged(input_ids=ids)
    assert max((h @ r).abs().max() for h in cache.residual.values()) < 1e-4
    if model.config.tie_word_embeddings:
        assert not merged.config.tie_word_embeddings
        assert merged.get_output_embeddings().weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()


def test_ablate_on_post_norm_model_refuses_to_merge():
    model, ids = make_tiny("gemma2"), ids_batch()
    pm = steered(model, layers=[1], op="ablate")
    before = logits(pm, ids)
    with pytest.raises(ValueError, match="cannot merge exactly into gemma2"):
        pm.merge_and_unload()
    assert torch.equal(logits(pm, ids), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_and_neuron_scales_match_capture_and_merge_exactly(arch):
    model, ids = make_tiny(arch), ids_batch()
    heads, neurons = {0: {1: 0.0, 3: 2.5}}, {1: {2: 0.0, 7: 3.0}}
    with capture.scale(model, heads=heads, neurons=neurons):
        expected = logits(model, ids)
    pm = get_peft_model(copy.deepcopy(model), SteeringConfig(head_scales=heads, neuron_scales=neurons))
    runtime = logits(pm, ids)
    torch.testing.assert_close(runtime, expected, atol=1e-6, rtol=0)
    pm.base_model.merge_adapter()
    torch.testing.assert_close(logits(pm, ids), runtime, atol=1e-5, rtol=0)
    pm.base_model.unmerge_adapter()
    assert torch.equal(logits(pm, ids), runtime)
    torch.testing.assert_close(logits(pm.merge_and_unload(), ids), runtime, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layers=[0, 1], alpha=2.0), "to_gguf_control_vector"),
        (dict(layers=[1], op="clamp", value=0.5), "clamp"),
        (dict(layers=[1], op="ablate", positions="generated"), "positions='generated'"),
    ],
)
def test_unmergeable_adapters_refuse_before_touching_weights(kwargs, message):
    model, ids = make_tiny("llama"), ids_batch()
    pm = steered(model, **kwargs)
    before = logits(pm, ids)
    with pytest.raises(ValueError, match=message):
        pm.merge_and_unload()
    assert torch.equal(logits(pm, ids), before)


# ---- generation, positions, KV cache ----------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "positions"), [(arch, "generated") for arch in ARCHS] + [("llama", "all"), ("llama", "prompt")]
)
def test_generate_with_cache_equals_without_cache(arch, positions):
    model, ids = make_tiny(arch), ids_batch()
    pm = steered(model, layers=[0, 1], alpha=6.0, positions=positions)
    assert torch.equal(greedy(pm, ids, use_cache=True), greedy(pm, ids, use_cache=False))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generated_positions_leave_the_prompt_untouched(arch):
    model, ids = make_tiny(arch), ids_batch()
    pm = steered(model, layers=[0, 1], alpha=6.0, positions="generated")
    with torch.no_grad(), capture.record(pm, residual=True, positions="all") as cache:
        pm(input_ids=ids)
    with torch.no_grad(), capture.record(model, residual=True, positions="all") as base_cache:
        model(input_ids=ids)
    for layer in cache.residual:
        assert torch.equal(cache.residual[layer], base_cache.residual[layer])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    out = pm.generate(input_ids=ids, **kwargs)
    with pm.disable_adapter():  # same generate path (PEFT's differs from plain transformers' by rounding)
        base = pm.generate(input_ids=ids, **kwargs)
    assert torch.equal(out.logits[0], base.logits[0])  # first new token comes from the prompt forward
    assert (out.logits[1] - base.logits[1]).abs().max() > 1e-3  # later tokens are steered


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_position_modes_in_a_manual_kv_cache_loop(positions):
    model, ids = make_tiny("llama"), ids_batch()
    pm = steered(model, layers=[0, 1], alpha=6.0, positions=positions)
    with torch.no_grad():
        first = pm(input_ids=ids, use_cache=True)
        nxt = first.logits[:, -1:].argmax(-1)
        cache = first.cache
        cache_copy = copy.deepcopy(cache)
        step = pm(input_ids=nxt, cache=cache).logits
        with pm.disable_adapter():
            unsteered = pm(input_ids=nxt, cache=cache_copy).logits
    prompt_changed = not torch.equal(first.logits, logits(model, ids))
    assert prompt_changed == (positions == "prompt")
    assert torch.equal(step, unsteered) == (positions == "prompt")


def test_disable_adapter_gives_the_base_model():
    model, ids = make_tiny("qwen2"), ids_batch()
    pm = steered(model, layers=[1], op="ablate")
    with pm.disable_adapter():
        assert torch.equal(logits(pm, ids), logits(model, ids))


# ---- conditional steering ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_condition_steers_only_rows_that_cross_the_threshold(arch):
    model, ids = make_tiny(arch), ids_batch(seed=3)
    c = torch.randn(spec_for(model).d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), capture.record(model, residual=[0], positions="all") as cache:
        base = model(input_ids=ids).logits
    scores = condition_scores(cache.residual[0], c / c.norm(), None, "cosine")
    trigger, other = int(scores.argmax()), int(scores.argmin())
    cond = SteeringCondition(direction=c, layer=0, threshold=float(scores.mean()), comparator=">")
    pm = steered(model, layers=[0, 1], alpha=6.0, condition=cond)
    out = logits(pm, ids)
    assert torch.equal(out[other], base[other])
    assert (out[trigger] - base[trigger]).abs().max() > 1e-3
    gen = greedy(pm, ids)
    assert torch.equal(gen, greedy(pm, ids, use_cache=False))
    assert torch.equal(gen[other], greedy(model, ids)[other])
    assert pm.base_model.steer_state.decisions["default"].tolist() == [i == trigger for i in range(2)]


def test_best_threshold_picks_side_and_rates():
    threshold, comparator, tpr, fpr = best_threshold(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0]))
    assert (comparator, tpr, fpr) == (">", 1.0, 0.0) and 0.0 < threshold < 1.0
    threshold, comparator, tpr, fpr = best_threshold(torch.tensor([-2.0, -1.0]), torch.tensor([1.0, 2.0, 0.5]))
    assert (comparator, tpr, fpr) == ("<", 1.0, 0.0) and -1.0 < threshold < 0.5


class CharTokenizer:
    """Minimal tokenizer (one id per character) for calibrating on tiny models."""

    chat_template = None
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(ch) % 80 for ch in text]}


def test_calibrate_condition_reports_rates_per_layer():
    model = make_tiny("llama")
    positive = ["aaaa bbb", "aab abab", "bbbb aaa", "abba baab"]
    negative = ["xyz zzyx", "zzzz yyy", "xxyy zzx", "yzyz xxy"]
    cond, report = calibrate_condition(model, CharTokenizer(), positive, negative, batch_size=3)
    assert set(report.tpr) == {0, 1} and report.chosen_layer == cond.layer
    assert report.tpr[cond.layer] - report.fpr[cond.layer] == 1.0  # in-sample directions separate perfectly
    assert "| layer |" in report.to_markdown()
    rates = selection_rates(model, CharTokenizer(), cond, positive + negative[:1], negative[1:])
    assert rates == {"tpr": 0.8, "fpr": 0.0, "n_positive": 5, "n_negative": 3}  # the one negative moved: 4 of 5
    pm = steered(model, layers=[1], alpha=5.0, condition=cond)
    ids = torch.tensor([[3 + ord(ch) % 80 for ch in positive[0]], [3 + ord(ch) % 80 for ch in negative[0]]])
    out, base = logits(pm, ids), logits(model, ids)
    assert torch.equal(out[1], base[1]) and not torch.equal(out[0], base[0])


# ---- save / load, fingerprints, several adapters ----------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_round_trip(arch, tmp_path):
    model, ids = make_tiny(arch), ids_batch()
    if arch == "gpt2":
        pm = steered(model, layers=[1], op="ablate", neuron_scales={0: {5: 0.0}})
    else:
        cond = SteeringCondition(direction=torch.ones(32), layer=0, threshold=-1.0)
        pm = steered(model, layers=[0, 1], alpha={0: 1.5, 1: 2.5}, head_scales={1: {0: 0.5}}, condition=None)
        pm.add_adapter("cond", SteeringConfig.from_directions(random_dirs(model, 1), layers=[1], condition=cond))
    expected = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".steer_" in key for key in saved)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "STEERING" and "ignore_fingerprint" not in config
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    if arch == "llama":
        loaded.load_adapter(tmp_path / "cond", adapter_name="cond")
        pm.set_adapter("cond")
        loaded.set_adapter("cond")
        assert torch.equal(logits(loaded, ids), logits(pm, ids))


def test_fingerprint_mismatch_and_override(tmp_path):
    model = make_tiny("llama")
    steered(model, layers=[1], alpha=2.0).save_pretrained(tmp_path)
    with pytest.raises(FingerprintMismatchError, match="different base model"):
        PeftModel.from_pretrained(make_tiny("llama", seed=1), tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny("llama", seed=1), tmp_path, ignore_fingerprint=True)
    assert isinstance(loaded.base_model.model.model.layers[1], SteeringLayer)


def test_second_adapter_reuses_wrapped_layers():
    model, ids = make_tiny("llama"), ids_batch()
    dirs = random_dirs(model)
    ablate_only = logits(steered(model, dirs, layers=[1], op="ablate"), ids)
    pm = steered(model, dirs, layers=[0], alpha=3.0)
    pm.add_adapter("ablate", SteeringConfig.from_directions(dirs, layers=[1], op="ablate"))
    pm.set_adapter("ablate")
    assert torch.equal(logits(pm, ids), ablate_only)
    pm.set_adapter("default")
    add_only = logits(pm, ids)
    pm.delete_adapter("ablate")
    assert torch.equal(logits(pm, ids), add_only)
    assert pm.base_model.model.model.embed_tokens.steer_plan == {}


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directions", "kwargs", "message"),
    [
        ({0: torch.full((32,), float("nan"))}, {}, "NaN"),
        ({0: torch.zeros(32)}, {}, "zero vector"),
        ({0: torch.ones(32)}, {"layers": [3]}, "no vector for layers"),
        ({0: torch.ones(32), 1: torch.ones(32)}, {"op": "ablate"}, "one direction"),
        ({0: torch.ones(32)}, {"op": "clamp"}, "finite `value`"),
        ({0: torch.ones(32)}, {"op": "steer"}, "`op` must be one of"),
        ({0: torch.ones(32)}, {"positions": "last"}, "`positions` must be one of"),
        ({0: torch.ones(32)}, {"alpha": float("inf")}, "finite number"),
        ({0: torch.ones(32)}, {"head_scales": {0: {1: float("nan")}}}, "finite number"),
    ],
)
def test_bad_config_raises_clear_value_error(directions, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SteeringConfig.from_directions(directions, **kwargs)


@pytest.mark.parametrize(
    ("directions", "kwargs", "message"),
    [
        ({5: torch.ones(32)}, {}, "layer index 5 is out of range"),
        ({0: torch.ones(32)}, {"head_scales": {0: {9: 0.0}}}, "head index 9 is out of range"),
        ({0: torch.ones(32)}, {"neuron_scales": {0: {48: 0.0}}}, "neuron index 48 is out of range"),
        ({0: torch.ones(16)}, {}, "d_model=32"),
    ],
)
def test_config_that_does_not_fit_the_model_raises(directions, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_tiny("llama"), SteeringConfig.from_directions(directions, **kwargs))


def test_config_without_directions_refuses_to_run():
    pm = get_peft_model(make_tiny("llama"), SteeringConfig(op="add", layers=[0]))
    with pytest.raises(ValueError, match="has no direction at layer 0"):
        logits(pm, ids_batch())
    with pytest.raises(ValueError, match="does nothing"):
        SteeringConfig()
    with pytest.raises(ValueError, match="conditional steering applies"):
        cond = SteeringCondition(direction=torch.ones(32), layer=0, threshold=0.0)
        SteeringConfig.from_directions({0: torch.ones(32)}, layers=[0], op="ablate", condition=cond)


# ---- the embedded model -----------------------------------------------------------------------


@pytest.mark.slow
def test_refusal_direction_steering_shifts_first_token_toward_refusal(embedded):
    """Diff-in-means refusal direction (8 harmful vs 8 harmless prompts) added at layers 8-19 makes the
    first answer token of held-out harmless prompts lean from "Sure"/"Here" toward "I"/"Sorry"."""
    from mi_peft.data import format_prompts, tokenize

    model, tok = embedded
    data = shared_data("refusal_direction")
    layers, n = list(range(8, 20)), 8

    def batch(name, start):
        rows = json.loads(Path(data, name).read_text())[start : start + n]
        encoded = tokenize(tok, format_prompts(tok, [row["instruction"] for row in rows]))
        return encoded["input_ids"], encoded["attention_mask"]

    means = {}
    for name in ("harmful_train.json", "harmless_train.json"):
        ids, mask = batch(name, 0)
        with torch.no_grad(), capture.record(model, residual=layers, positions="last", attention_mask=mask) as cache:
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        means[name] = {layer: h.mean(0) for layer, h in cache.residual.items()}
    dirs = {layer: means["harmful_train.json"][layer] - means["harmless_train.json"][layer] for layer in layers}
    alpha = {layer: 0.4 * float(dirs[layer].norm()) for layer in layers}
    refuse = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("I", "Sorry")]
    comply = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Sure", "Here")]
    ids, mask = batch("harmless_test.json", 0)

    def metric(m):
        with torch.no_grad():
            lp = m(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].log_softmax(-1)
        return lp[:, refuse].logsumexp(-1) - lp[:, comply].logsumexp(-1)

    base_metric = metric(model)
    pm = get_peft_model(model, SteeringConfig.from_directions(dirs, layers=layers, alpha=alpha))
    try:
        steered_metric = metric(pm)
    finally:
        pm.unload()
    assert not any(isinstance(m, SteeringLayer) for m in model.modules())
    assert (steered_metric > base_metric).float().mean() >= 0.75
    assert (steered_metric - base_metric).mean() > 1.0
