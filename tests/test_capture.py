import pytest
import torch
from conftest import make_tiny

from mi_peft import capture
from mi_peft.arch import spec_for


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(
    ("positions", "pos_axis"),
    [("last", ()), ("mean", ()), ("all", (7,)), ([0, 2], (2,)), ([-1], (1,))],
)
def test_record_leaves_logits_bit_identical(tiny_model, tiny_batch, positions, pos_axis):
    ids, mask = tiny_batch
    spec = spec_for(tiny_model)
    base = logits(tiny_model, ids, mask)
    hooks_before = _hook_count(tiny_model)
    with capture.record(
        tiny_model, heads=True, neurons=True, residual=True, positions=positions, attention_mask=mask
    ) as cache:
        assert _hook_count(tiny_model) == hooks_before + 3 * spec.n_layers
        out = logits(tiny_model, ids, mask)
    assert torch.equal(base, out)
    assert _hook_count(tiny_model) == hooks_before
    assert cache.stack("heads").shape == (3, spec.n_layers, *pos_axis, spec.n_heads, spec.head_dim)
    assert cache.stack("neurons").shape == (3, spec.n_layers, *pos_axis, spec.n_neurons)
    assert cache.stack("residual").shape == (3, spec.n_layers, *pos_axis, spec.d_model)
    for kind in ("heads", "neurons", "residual"):
        assert sorted(cache[kind]) == list(range(spec.n_layers))


def test_intervention_hooks_are_removed_after_the_context(tiny_batch):
    model = make_tiny("llama")
    ids, mask = tiny_batch
    base = logits(model, ids, mask)
    with capture.edit(model, residual={0: lambda x: x + 1.0}), capture.ablate(model, neurons={1: [0, 1, 2]}):
        assert _hook_count(model) == 2
        edited = logits(model, ids, mask)
    assert not torch.equal(edited, base)
    assert _hook_count(model) == 0
    assert torch.equal(logits(model, ids, mask), base)


def test_last_position_respects_padding(tiny_batch):
    model = make_tiny("llama")
    ids, mask = tiny_batch
    with capture.record(model, residual=[1], positions="all", attention_mask=mask) as full:
        logits(model, ids, mask)
    with capture.record(model, residual=[1], positions="last", attention_mask=mask) as last:
        logits(model, ids, mask)
    assert torch.equal(last.residual[1][1], full.residual[1][1, 4])
    assert torch.equal(last.residual[1][0], full.residual[1][0, 6])


def test_self_patching_every_head_leaves_logits_unchanged(tiny_model, tiny_batch):
    ids, mask = tiny_batch
    spec = spec_for(tiny_model)
    base = logits(tiny_model, ids, mask)
    with capture.record(tiny_model, heads=True, neurons=True, residual=True, positions="all") as cache:
        logits(tiny_model, ids, mask)
    every = {layer: range(spec.n_heads) for layer in range(spec.n_layers)}
    with capture.patch(tiny_model, cache, heads=every, residual=range(spec.n_layers)):
        patched = logits(tiny_model, ids, mask)
    torch.testing.assert_close(patched, base, atol=1e-6, rtol=0)


def _zero_head_columns(model, spec, layer, head):
    proj = spec.attn_out_module(model, layer)
    cols = slice(head * spec.head_dim, (head + 1) * spec.head_dim)
    with torch.no_grad():
        if spec.conv1d:
            proj.weight[cols, :] = 0
        else:
            proj.weight[:, cols] = 0


def test_zero_ablating_head_equals_zeroing_its_columns(tiny_model, tiny_batch):
    ids, mask = tiny_batch
    spec = spec_for(tiny_model)
    with capture.ablate(tiny_model, heads={1: [2]}, mode="zero"):
        ablated = logits(tiny_model, ids, mask)
    _zero_head_columns(tiny_model, spec, 1, 2)
    torch.testing.assert_close(ablated, logits(tiny_model, ids, mask), atol=1e-5, rtol=0)


def test_head_contributions_sum_to_attention_output(tiny_model, tiny_batch):
    ids, mask = tiny_batch
    spec = spec_for(tiny_model)
    proj = spec.attn_out_module(tiny_model, 0)
    seen = {}
    handle = proj.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        with capture.record(tiny_model, heads=[0], positions="all") as cache:
            logits(tiny_model, ids, mask)
    finally:
        handle.remove()
    z = cache.heads[0]  # [b, pos, H, D]
    weight = proj.weight.T if spec.conv1d else proj.weight  # [d_model, H*D]
    per_head = torch.einsum("bphd,mhd->bphm", z, weight.unflatten(1, (spec.n_heads, spec.head_dim)))
    total = per_head.sum(2) + (proj.bias if proj.bias is not None else 0)
    torch.testing.assert_close(total, seen["out"], atol=1e-5, rtol=1e-5)


def test_mean_ablation_and_scale(tiny_batch):
    model = make_tiny("qwen2")
    ids, mask = tiny_batch
    with capture.record(model, heads=True, neurons=True, positions="mean", attention_mask=mask) as means:
        base = logits(model, ids, mask)
    with capture.ablate(model, neurons={0: [3, 4]}, mode="mean", means=means):
        mean_ablated = logits(model, ids, mask)
    assert not torch.equal(mean_ablated, base)
    with capture.scale(model, heads={0: {1: 1.0}}, neurons={1: {0: 1.0}}):
        torch.testing.assert_close(logits(model, ids, mask), base, atol=0, rtol=0)
    with capture.scale(model, heads={0: {1: 0.0}}):
        scaled = logits(model, ids, mask)
    with capture.ablate(model, heads={0: [1]}):
        torch.testing.assert_close(scaled, logits(model, ids, mask), atol=0, rtol=0)


def test_gradients_flow_to_captured_positions(tiny_batch):
    model = make_tiny("llama")
    ids, mask = tiny_batch
    with capture.record(model, heads=True, neurons=[1], positions="last", attention_mask=mask, detach=False) as cache:
        out = model(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    metric = out[torch.arange(3), last, 5].sum()
    grads = torch.autograd.grad(metric, [cache.heads[1], cache.neurons[1]])
    assert grads[0].shape == (3, 4, 8) and grads[0].abs().sum() > 0
    assert grads[1].abs().sum() > 0


def test_hooks_removed_on_exception(tiny_batch):
    model = make_tiny("llama")
    ids, mask = tiny_batch
    base = logits(model, ids, mask)
    with pytest.raises(RuntimeError, match="boom"), capture.ablate(model, heads={0: [0, 1, 2, 3]}):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids, mask), base)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(heads={5: [0]}), r"layer index 5 is out of range.*0\.\.1"),
        (dict(heads={0: [9]}), r"head index 9 is out of range.*0\.\.3"),
        (dict(neurons={0: [48]}), r"neuron index 48 is out of range.*0\.\.47"),
        (dict(heads={0: []}), "empty heads selection"),
    ],
)
def test_bad_indices_raise_clear_errors(kwargs, message):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match=message), capture.ablate(model, **kwargs):
        pass


def test_empty_position_set_names_allowed_range(tiny_batch):
    model = make_tiny("llama")
    ids, mask = tiny_batch
    with (
        pytest.raises(ValueError, match=r"empty position set.*0\.\.6"),
        capture.record(model, heads=True, positions=[]),
    ):
        logits(model, ids, mask)
    with pytest.raises(ValueError, match=r"out of range.*0\.\.6"), capture.record(model, heads=True, positions=[7]):
        logits(model, ids, mask)
