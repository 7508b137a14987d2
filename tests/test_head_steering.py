"""Head steering (ITI): runtime equals a hand-written o_proj hook, probe top heads, save/load, merge, bad input."""

from __future__ import annotations

import copy
import functools
import json
import random

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_locate import tiny_tokenizer
from transformers import AutoModelForCausalLM

from mi_peft import capture
from mi_peft.arch import spec_for
from mi_peft.data import ContrastivePairs
from mi_peft.fingerprint import model_fingerprint
from mi_peft.locate import LocalizationResult, locate
from mi_peft.tuners.steering import HeadDirections, SteeringConfig, SteeringLayer, head_directions

# d_model 128, 4 heads of 32: realistic shapes (multiples of 64), tiny enough for CPU tests
CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kw,
    ),
    "gpt2": lambda **kw: transformers.GPT2Config(vocab_size=96, n_embd=128, n_layer=3, n_head=4, n_positions=64, **kw),
    "gpt_neox": lambda **kw: transformers.GPTNeoXConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, **kw
    ),
}
HEAD_DIM = 32
X, Y = 5, 6  # marker token of positive prompts and its twin on negative ones


def make(arch: str = "llama", seed: int = 0, **config):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](**config), attn_implementation="eager")
    return model.eval()


def ids_batch(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_heads(where: dict[int, list[int]], seed: int = 0, size: int = HEAD_DIM):
    """Random (non-unit) vectors and sigmas for the given ``{layer: [heads]}``."""
    gen = torch.Generator().manual_seed(seed)
    vectors = {layer: {h: 3.0 * torch.randn(size, generator=gen) for h in heads} for layer, heads in where.items()}
    stds = {layer: {h: 0.2 + float(torch.rand(1, generator=gen)) for h in heads} for layer, heads in where.items()}
    return vectors, stds


def manual_shift_hooks(model, vectors, stds, alpha):
    """Forward pre-hooks on each layer's o_proj adding alpha * sigma * unit(v) to the head's input slice."""
    spec, handles = spec_for(model), []
    for layer, heads in vectors.items():
        delta = torch.zeros(spec.n_heads * spec.head_dim)
        a = alpha[layer] if isinstance(alpha, dict) else alpha
        for head, v in heads.items():
            delta[head * spec.head_dim : (head + 1) * spec.head_dim] = a * stds[layer][head] * v / v.norm()

        def hook(_module, args, delta=delta):
            return (args[0] + delta.to(args[0].dtype),)

        handles.append(spec.attn_out_module(model, layer).register_forward_pre_hook(hook))
    return handles


def steered(model, vectors, stds, alpha, **kwargs):
    cfg = SteeringConfig(head_directions=vectors, head_stds=stds, alpha=alpha, **kwargs)
    return get_peft_model(copy.deepcopy(model), cfg)


# ---- runtime ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_head_steering_equals_manual_o_proj_pre_hook(arch):
    model, ids = make(arch), ids_batch()
    vectors, stds = random_heads({0: [1, 3], 2: [0]})
    alpha = {0: 2.0, 2: -3.0}
    handles = manual_shift_hooks(model, vectors, stds, alpha)
    manual = logits(model, ids)
    for handle in handles:
        handle.remove()
    base = logits(model, ids)
    pm = steered(model, vectors, stds, alpha)
    assert pm.get_nb_trainable_parameters()[0] == 0
    out = logits(pm, ids)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=0)
    assert (out - base).abs().max() > 1e-2
    # the same vectors on other heads steer differently: the slice is the head's, not any slice
    moved = {layer: {(h + 1) % 4: v for h, v in heads.items()} for layer, heads in vectors.items()}
    moved_stds = {layer: {(h + 1) % 4: s for h, s in heads.items()} for layer, heads in stds.items()}
    assert (logits(steered(model, moved, moved_stds, alpha), ids) - out).abs().max() > 1e-2
    with pm.disable_adapter():
        assert torch.equal(logits(pm, ids), base)


def test_head_scale_then_shift_in_one_adapter():
    model, ids = make(), ids_batch()
    vectors, stds = random_heads({1: [2]})
    with capture.scale(model, heads={1: {2: 0.5, 0: 0.0}}):
        handles = manual_shift_hooks(model, vectors, stds, 4.0)  # registered after: runs after the scaling
        manual = logits(model, ids)
        for handle in handles:
            handle.remove()
    pm = steered(model, vectors, stds, 4.0, head_scales={1: {2: 0.5, 0: 0.0}})
    torch.testing.assert_close(logits(pm, ids), manual, atol=1e-5, rtol=0)


def test_generated_positions_leave_the_prompt_alone_and_cache_agrees():
    model, ids = make(), ids_batch()
    vectors, stds = random_heads({1: [0, 2]})
    pm = steered(model, vectors, stds, 8.0, positions="generated")
    assert torch.equal(logits(pm, ids), logits(model, ids))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with_cache = pm.generate(input_ids=ids, use_cache=True, **kwargs)
    assert torch.equal(with_cache, pm.generate(input_ids=ids, use_cache=False, **kwargs))
    out = pm.generate(input_ids=ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    with pm.disable_adapter():
        base = pm.generate(input_ids=ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.logits[0], base.logits[0])  # the first new token comes from the prompt forward
    assert (out.logits[1] - base.logits[1]).abs().max() > 1e-3


# ---- from_head_probes ---------------------------------------------------------------------------


def probe_result(model, scores: torch.Tensor) -> LocalizationResult:
    return LocalizationResult.from_model(model, {"heads": scores}, method="probe")


def all_heads(model, seed: int = 0) -> HeadDirections:
    spec = spec_for(model)
    vectors, stds = random_heads({layer: list(range(spec.n_heads)) for layer in range(spec.n_layers)}, seed)
    units = {layer: {h: v / v.norm() for h, v in heads.items()} for layer, heads in vectors.items()}
    norms = {layer: {h: float(v.norm()) for h, v in heads.items()} for layer, heads in vectors.items()}
    return HeadDirections(vectors=units, stds=stds, norms=norms, model_type=spec.model_type)


def test_from_head_probes_steers_the_top_heads():
    model, ids = make(), ids_batch()
    scores = torch.full((3, 4), 0.5) + 0.01 * torch.arange(12.0).reshape(3, 4)  # chance level, all distinct
    scores[2, 1], scores[0, 3], scores[1, 2], scores[1, 0] = 0.97, 0.93, 0.9, float("nan")
    result, dirs = probe_result(model, scores), all_heads(model)
    cfg = SteeringConfig.from_head_probes(result, dirs, top_k=3, alpha=6.0)
    top = {2: [1], 0: [3], 1: [2]}
    assert {layer: sorted(heads) for layer, heads in cfg.head_stds.items()} == top
    assert cfg.head_stds[2][1] == dirs.stds[2][1]
    torch.testing.assert_close(cfg.head_directions[0][3], dirs.vectors[0][3], atol=1e-7, rtol=0)
    assert cfg.base_model_fingerprint == result.model_fingerprint and cfg.model_type == "llama"
    assert set(SteeringConfig.from_head_probes(result, dirs, top_k=1, alpha=6.0).head_stds) == {2}
    pm = get_peft_model(copy.deepcopy(model), cfg)
    picked = {layer: {h: dirs.vectors[layer][h] for h in heads} for layer, heads in top.items()}
    handles = manual_shift_hooks(model, picked, dirs.stds, 6.0)
    manual = logits(model, ids)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(logits(pm, ids), manual, atol=1e-5, rtol=0)
    explicit = SteeringConfig.from_head_probes(
        result, dirs.vectors, top_k=2, alpha=6.0, head_stds={2: {1: 0.5}, 0: {3: 0.25}}
    )
    assert explicit.head_stds == {2: {1: 0.5}, 0: {3: 0.25}}


def _without_layer_2(dirs: HeadDirections) -> HeadDirections:
    vectors = {layer: heads for layer, heads in dirs.vectors.items() if layer != 2}
    return HeadDirections(vectors=vectors, stds=dirs.stds, norms={}, model_type="llama")


def _other_model(dirs: HeadDirections) -> HeadDirections:
    fingerprint = model_fingerprint(make(seed=1))
    return HeadDirections(dirs.vectors, dirs.stds, dirs.norms, model_type="llama", model_fingerprint=fingerprint)


# each case: (result, directions, keyword arguments) from a probe result and directions for every head
BAD_PROBE_INPUTS = {
    "top_k above the scored heads": (
        lambda r, d: (r, d, dict(top_k=12)),
        "`top_k=12` but the result scores only 11 heads",
    ),
    "top_k zero": (lambda r, d: (r, d, dict(top_k=0)), "`top_k` must be a positive int"),
    "no vector for a top head": (lambda r, d: (r, _without_layer_2(d), {}), "no vector for layer 2 head 1"),
    "no sigma": (lambda r, d: (r, d.vectors, {}), "needs each head's sigma"),
    "residual directions": (
        lambda r, d: (r, {layer: torch.randn(128) for layer in range(3)}, {}),
        "residual-stream directions belong in `from_directions`",
    ),
    "wrong head size": (
        lambda r, d: (r, {2: {1: torch.randn(16)}}, dict(top_k=1, head_stds={2: {1: 0.5}})),
        "have 16 entries but the result's llama model has head_dim=32",
    ),
    "result without heads": (
        lambda r, d: (LocalizationResult.from_model(make(), {"residual": torch.rand(3)}, method="probe"), d, {}),
        "with 'heads' scores",
    ),
    "directions of another model": (lambda r, d: (r, _other_model(d), {}), "computed on different models"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROBE_INPUTS))
def test_from_head_probes_bad_input(case):
    build, message = BAD_PROBE_INPUTS[case]
    model = make()
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    scores[2, 1], scores[1, 0] = 0.99, float("nan")
    result, directions, kwargs = build(probe_result(model, scores), all_heads(model))
    with pytest.raises(ValueError, match=message):
        SteeringConfig.from_head_probes(result, directions, **{"top_k": 3, "alpha": 2.0, **kwargs})


# ---- head_directions: mass-mean direction and sigma from captured activations -------------------


def marker_pairs(n: int = 12, seed: int = 0) -> ContrastivePairs:
    rng = random.Random(seed)
    stems = [" ".join(f"w{rng.randrange(10, 90)}" for _ in range(rng.randrange(3, 7))) for _ in range(n)]
    return ContrastivePairs([f"{s} w{X}" for s in stems], [f"{s} w{Y}" for s in stems])


def planted_model(delta: torch.Tensor, layer: int = 1, head: int = 2):
    """A model to which X and Y are the same token, except that ``delta`` joins head ``head`` of ``layer``
    at X tokens: the only difference between positive and negative prompts."""
    model = make()
    with torch.no_grad():
        model.get_input_embeddings().weight[Y] = model.get_input_embeddings().weight[X]
    spec, state = spec_for(model), {}
    full = torch.zeros(spec.n_heads * spec.head_dim)
    full[head * spec.head_dim : (head + 1) * spec.head_dim] = delta

    def grab_ids(_module, _args, kwargs):
        state["ids"] = kwargs["input_ids"]

    def add_delta(_module, args):
        return (args[0] + (state["ids"] == X).to(args[0].dtype)[..., None] * full,)

    model.register_forward_pre_hook(grab_ids, with_kwargs=True)
    spec.attn_out_module(model, layer).register_forward_pre_hook(add_delta)
    return model


def test_head_directions_recovers_a_planted_head_and_its_sigma():
    delta = 4.0 * torch.randn(HEAD_DIM, generator=torch.Generator().manual_seed(3))
    model, tok, pairs = planted_model(delta), tiny_tokenizer(), marker_pairs()
    dirs = head_directions(model, tok, pairs, batch_size=5, progress=False)
    assert torch.nn.functional.cosine_similarity(dirs.vectors[1][2], delta, dim=0) > 1 - 1e-5
    assert dirs.norms[1][2] == pytest.approx(float(delta.norm()), rel=1e-4)
    flat = {tuple(h) for h in dirs.extra["flat_heads"]}
    assert {(0, h) for h in range(4)} | {(1, 0), (1, 1), (1, 3)} == flat  # identical on both sides
    assert set(dirs.vectors) == {1, 2} and set(dirs.vectors[2]) == {0, 1, 2, 3}
    # sigma: population std of the last-token head activations (one prompt at a time, no padding) on the unit
    projections = []
    for text in pairs.positive + pairs.negative:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad(), capture.record(model, heads=[1], positions="last") as cache:
            model(input_ids=ids)
        projections.append(float(cache.heads[1][0, 2] @ dirs.vectors[1][2]))
    expected = torch.tensor(projections, dtype=torch.float64).std(unbiased=False)
    assert dirs.stds[1][2] == pytest.approx(float(expected), rel=1e-4)


def test_probe_locate_then_from_head_probes_end_to_end():
    delta = 30.0 * torch.randn(HEAD_DIM, generator=torch.Generator().manual_seed(3)) / HEAD_DIM**0.5
    model, tok, pairs = planted_model(delta), tiny_tokenizer(), marker_pairs(16)
    result = locate(model, tok, pairs, method="probe", components="heads", batch_size=8, progress=False)
    assert result.top("heads", 1)[0][0] == (1, 2)  # the earliest perfectly separating head
    cfg = SteeringConfig.from_head_probes(result, head_directions(model, tok, pairs, progress=False), top_k=1, alpha=5)
    assert cfg.head_stds.keys() == {1} and cfg.head_stds[1].keys() == {2}
    assert torch.nn.functional.cosine_similarity(cfg.head_directions[1][2], delta, dim=0) > 1 - 1e-5


# ---- save / load ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_round_trip_reproduces_logits(arch, tmp_path):
    model, ids = make(arch), ids_batch()
    vectors, stds = random_heads({0: [2], 2: [1, 3]})
    pm = steered(model, vectors, stds, {0: 3.0, 2: 5.0})
    expected = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "head_directions" not in saved  # vectors live in the safetensors file
    assert saved["head_stds"] == {str(k): {str(h): s for h, s in v.items()} for k, v in stds.items()}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    heads = {k: v for k, v in tensors.items() if "steer_head_direction" in k}
    assert len(heads) == 2 and all(v.shape == (4, HEAD_DIM) for v in heads.values())
    loaded = PeftModel.from_pretrained(make(arch), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    assert loaded.peft_config["default"].head_directions is None  # the config holds sigma, the buffers the vectors


def test_head_stds_without_directions_refuses_to_run():
    model = make()
    pm = get_peft_model(copy.deepcopy(model), SteeringConfig(head_stds={1: {0: 0.5}}, alpha=2.0))
    with pytest.raises(ValueError, match="has no direction at layer 1"):
        logits(pm, ids_batch())


# ---- merge ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "config"), [("gpt2", {}), ("gpt_neox", {}), ("llama", {"attention_bias": True})])
def test_merge_folds_the_shift_into_the_o_proj_bias_exactly(arch, config, tmp_path):
    model, ids = make(arch, **config), ids_batch()
    vectors, stds = random_heads({0: [1], 1: [0, 3]})
    pm = steered(model, vectors, stds, {0: 4.0, 1: -2.0}, head_scales={1: {3: 0.5, 2: 0.0}})
    runtime = logits(pm, ids)
    assert (runtime - logits(model, ids)).abs().max() > 1e-2
    spec = spec_for(model)
    o_proj = functools.reduce(getattr, spec.attn_out.split("."), spec.decoder_layers(pm)[0].get_base_layer())
    weight, bias = o_proj.weight.detach().clone(), o_proj.bias.detach().clone()
    pm.base_model.merge_adapter()
    torch.testing.assert_close(logits(pm, ids), runtime, atol=1e-5, rtol=0)
    assert torch.equal(o_proj.weight, weight) and not torch.equal(o_proj.bias, bias)
    pm.base_model.unmerge_adapter()
    assert torch.equal(o_proj.bias, bias) and torch.equal(logits(pm, ids), runtime)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, SteeringLayer) or m._forward_pre_hooks for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), runtime, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded, ids), runtime, atol=1e-5, rtol=0)


def test_merge_without_o_proj_bias_refuses_and_changes_nothing():
    model, ids = make("llama"), ids_batch()
    vectors, stds = random_heads({1: [2]})
    pm = steered(model, vectors, stds, 3.0)
    before = logits(pm, ids)
    weights = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError, match="attention output projection has no bias"):
        pm.merge_and_unload()
    assert all(torch.equal(v, weights[k]) for k, v in pm.state_dict().items())
    assert torch.equal(logits(pm, ids), before)


def test_merge_refuses_shift_and_another_adapters_scale_on_the_same_head():
    model = make("gpt2")
    vectors, stds = random_heads({1: [2]})
    pm = steered(model, vectors, stds, 3.0)
    pm.add_adapter("scales", SteeringConfig(head_scales={1: {2: 0.5}}))
    pm.base_model.set_adapter(["default", "scales"])
    with pytest.raises(ValueError, match="steers heads \\[2\\] of layer 1 that adapter 'scales' scales"):
        pm.base_model.merge_adapter(["default", "scales"])


# ---- bad input ---------------------------------------------------------------------------------------


def vec(size: int = HEAD_DIM, fill: float | None = None) -> torch.Tensor:
    v = torch.randn(size, generator=torch.Generator().manual_seed(0))
    if fill is not None:
        v[3] = fill
    return v


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(head_directions={0: {1: vec(fill=float("nan"))}}), "`head_directions\\[0\\]\\[1\\]` contains NaN or inf"),
        (dict(head_directions={0: {1: vec(fill=float("inf"))}}), "contains NaN or infinite"),
        (dict(head_directions={0: {1: torch.zeros(HEAD_DIM)}}), "is the zero vector"),
        (dict(head_directions={0: {1: torch.ones(2, 16)}}), "must be a 1-D vector"),
        (dict(head_directions={0: {1: vec(), 2: vec(16)}}), "different lengths \\[16, 32\\]"),
        (dict(head_directions={0: {1: vec()}}, head_stds=None), "heads without sigma \\[\\(0, 1\\)\\]"),
        (dict(head_directions={0: {1: vec()}}, head_stds={0: {1: 0.5, 2: 0.5}}), "sigma without a direction"),
        (dict(head_directions={0: {1: vec()}}, head_stds={0: {1: 0.0}}), "values must be > 0"),
        (dict(head_directions={0: {1: vec()}}, head_stds={0: {1: float("nan")}}), "finite number"),
        (dict(head_directions={0: {1: vec()}}, alpha={1: 2.0}), "`alpha` has no value for layers \\[0\\]"),
        (dict(head_directions={0: {"x": vec()}}), "key must be an int"),
        (dict(head_directions={0: {}}), "non-empty"),
    ],
)
def test_config_rejects_bad_head_directions(kwargs, message):
    kwargs = {"head_stds": {0: {1: 0.5}}, "alpha": 2.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        SteeringConfig(**kwargs)


def test_condition_with_head_steering_is_refused():
    with pytest.raises(ValueError, match="without head/neuron scales or head directions"):
        SteeringConfig(
            op="add",
            layers=[1],
            head_directions={0: {1: vec()}},
            head_stds={0: {1: 0.5}},
            condition={"layer": 0, "threshold": 0.1},
        )


@pytest.mark.parametrize(
    ("where", "size", "message"),
    [
        ((3, 0), HEAD_DIM, "names layer 3, but this llama model has 3 layers \\(0..2\\)"),
        ((1, 4), HEAD_DIM, "names head 4 of layer 1, but this llama model has 4 heads per layer \\(0..3\\)"),
        ((1, -1), HEAD_DIM, "names head -1 of layer 1, but this llama model has 4 heads per layer"),
        ((1, 0), 64, "has 64 entries but this llama model's heads have head_dim=32"),
    ],
)
def test_model_rejects_unknown_heads_and_wrong_sizes(where, size, message):
    layer, head = where
    cfg = SteeringConfig(head_directions={layer: {head: vec(size)}}, head_stds={layer: {head: 0.5}}, alpha=1.0)
    with pytest.raises(ValueError, match=message):
        get_peft_model(make(), cfg)
