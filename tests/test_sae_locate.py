"""The "sae" kind of locate() and LocalizationResult, and `mi-peft sae train|locate|explain` (tiny model and SAEs).

Attribution patching through the SAE equals a hand computation with plain autograd (latent difference x
d metric / d latent, the SAE spliced in with its error term); the error term keeps the logits unchanged
while scoring; top/select/plot/save/load work for the kind; bad inputs raise errors that name the fix.
The tiny model, tokenizer and SAE come from test_sae (whose module fixtures run here too).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from test_sae import _needs_sae_lens, _one_thread, tiny_model, tiny_sae, word_tokenizer  # noqa: F401

from mi_peft import ContrastivePairs, locate
from mi_peft import sae as msae
from mi_peft.cli import main
from mi_peft.fingerprint import FingerprintMismatchError
from mi_peft.locate import LatentSet, LocalizationResult, latent_stats

POSITIVE = ["w1 w2 w3 w4", "w5 w6 w7", "w8 w9 w10 w11 w12", "w13 w14"]
NEGATIVE = ["w20 w21 w22", "w23 w24 w25 w26 w27", "w28 w29", "w30 w31 w32 w33"]
PAIRS = ContrastivePairs(POSITIVE, NEGATIVE)


def metric(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return logits[:, -1, 5] - logits[:, -1, 6]


def two_sites(model):
    """SAEs at layers 0 (192 latents) and 1 (256 latents): the narrower row of scores["sae"] is NaN-padded."""
    return [msae.attach(tiny_sae(layer=0, d_sae=192, seed=1), model), msae.attach(tiny_sae(), model)]


def _hook(model, layer, fn):
    """A plain forward hook replacing decoder layer ``layer``'s hidden states by ``fn(hidden)``."""

    def hook(module, args, output):
        return (fn(output[0]), *output[1:]) if isinstance(output, tuple) else fn(output)

    return model.model.layers[layer].register_forward_hook(hook)


def _grab(store, layer, sae):
    def fn(h):
        store[layer] = sae.encode(h)[0, -1].detach()
        return h

    return fn


def _splice(leaves, layer, sae):
    """The SAE with its error term, ``decode(f) + (x - decode(f))``, where f is a fresh leaf."""

    def fn(h):
        leaves[layer] = f = sae.encode(h).detach().requires_grad_(True)
        return sae.decode(f) + (h - sae.decode(f).detach())

    return fn


def hand_attribution(model, tok, sites) -> dict[int, torch.Tensor]:
    """Per pair, unpadded: (f_pos - f_neg) at the last token x d metric / d f from plain autograd; mean over pairs."""
    totals = {s.layer: torch.zeros(s.d_sae) for s in sites}
    for pos, neg in zip(POSITIVE, NEGATIVE, strict=True):
        f_pos, leaves = {}, {}
        handles = [_hook(model, s.layer, _grab(f_pos, s.layer, s.sae)) for s in sites]
        with torch.no_grad():
            model(input_ids=torch.tensor([tok(pos)["input_ids"]]))
        for h in handles:
            h.remove()
        handles = [_hook(model, s.layer, _splice(leaves, s.layer, s.sae)) for s in sites]
        ids = torch.tensor([tok(neg)["input_ids"]])
        value = metric(model(input_ids=ids).logits, {"input_ids": ids})
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(value.sum(), [leaves[s.layer] for s in sites])
        for s, g in zip(sites, grads, strict=True):
            totals[s.layer] += (f_pos[s.layer] - leaves[s.layer][0, -1].detach()) * g[0, -1]
    return {layer: t / len(POSITIVE) for layer, t in totals.items()}


@pytest.mark.parametrize("n_saes", [1, 2])
def test_attribution_patching_through_the_sae_equals_a_hand_computation(n_saes):
    model, tok = tiny_model(), word_tokenizer()
    sites = two_sites(model)[-n_saes:]
    result = locate(model, tok, PAIRS, method="attribution_patching", sae=sites, metric=metric, batch_size=3)
    expected = hand_attribution(model, tok, sites)
    assert result.kinds == ["sae"] and result.scores["sae"].shape == (2, 256) and result.metric == "metric"
    for s in sites:
        row = result.scores["sae"][s.layer]
        assert float(row[: s.d_sae].abs().max()) > 1e-3  # real, non-trivial scores
        torch.testing.assert_close(row[: s.d_sae], expected[s.layer], rtol=1e-4, atol=1e-6)
        assert torch.isnan(row[s.d_sae :]).all()
    if n_saes == 1:
        assert torch.isnan(result.scores["sae"][0]).all()
    assert set(result.extra["sae"]) == {str(s.layer) for s in sites} and "metric_negative" in result.extra


def test_the_error_term_keeps_the_logits_unchanged_while_scoring():
    model, tok = tiny_model(), word_tokenizer()
    flags = [p.requires_grad for p in model.parameters()]
    seen = []

    def recording(logits, batch):
        seen.append(logits.detach().clone())
        return metric(logits, batch)

    locate(model, tok, PAIRS, method="attribution_patching", sae=two_sites(model), metric=recording, batch_size=4)
    neg = next(iter(PAIRS.batches(tok, batch_size=4)))[1]
    inputs = {k: neg[k] for k in ("input_ids", "attention_mask", "position_ids") if k in neg}
    with torch.no_grad():  # locate's forwards run without a KV cache; with one, transformers >= 5.25 differs by ~1e-7
        plain = model(**inputs, use_cache=False).logits
    assert seen[0].shape == plain.shape  # the first scoring forward returns every position's logits
    torch.testing.assert_close(seen[0], plain, rtol=0, atol=0)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, use_cache=False).logits, plain, rtol=0, atol=0)  # no hook left


def test_activation_stats_is_the_fisher_ratio_of_each_latent():
    model, tok = tiny_model(), word_tokenizer()
    site = msae.attach(tiny_sae(), model)
    result = locate(model, tok, PAIRS, method="activation_stats", sae=site)

    def last(texts):
        return torch.stack(
            [
                site.encode(msae.residual_at(model, 1, {"input_ids": torch.tensor([tok(t)["input_ids"]])}))[0, -1]
                for t in texts
            ]
        ).double()

    p, q = last(POSITIVE), last(NEGATIVE)
    pooled = (3 * p.var(0) + 3 * q.var(0)) / 6
    fisher = (p.mean(0) - q.mean(0)) ** 2 / pooled.clamp_min(1e-12)
    live = pooled > 1e-6
    torch.testing.assert_close(result.scores["sae"][1][live].double(), fisher[live], rtol=1e-3, atol=1e-5)
    abs_diff = torch.tensor(result.extra["abs_diff"]["1"])
    torch.testing.assert_close(abs_diff, (p.mean(0) - q.mean(0)).float(), rtol=1e-4, atol=1e-5)


def test_top_select_frame_and_plot_on_the_sae_kind(tmp_path):
    model, tok = tiny_model(), word_tokenizer()
    sites = two_sites(model)
    result = locate(model, tok, PAIRS, method="mean_diff", sae=sites)
    flat = result.scores["sae"].flatten()
    best = flat.nan_to_num().abs().argsort(descending=True)[:6]
    top = result.top("sae", 6)
    assert top == [((int(i) // 256, int(i) % 256), float(flat[i])) for i in best]
    highest = result.top("sae", 3, sign="positive")
    assert [s for _, s in highest] == sorted(flat[~flat.isnan()].tolist(), reverse=True)[:3]
    assert result.top("sae", 1, sign="negative")[0][1] == pytest.approx(float(flat.nan_to_num(1e9).min()))

    chosen = result.select(top_k=6, kinds=("sae",))
    assert isinstance(chosen, LatentSet) and len(chosen) == 6
    assert sorted(chosen.to_list()) == sorted((layer, i) for (layer, i), _ in top)
    assert result.select(top_k={"sae": 6}, kinds="sae") == chosen
    cut = abs(top[3][1])
    assert result.select(threshold=cut, kinds=("sae",)).to_list() == sorted(a for a, s in top if abs(s) >= cut)
    control = result.select(top_k=6, kinds=("sae",), random=0)
    assert len(control) == 6 and control != chosen
    with pytest.raises(TypeError, match="not adapter components"):
        list(chosen)

    at_one = chosen.at(1)
    config = msae.SAESteeringConfig.from_sae(sites[1], chosen, op="add", alpha=2.0)
    assert config.latents == at_one and len(at_one) > 0
    steered = get_peft_model(model, config)  # the selection drives a real adapter
    assert steered.peft_config["default"].layer == 1
    steered.unload()

    frame = result.to_frame()
    rows = frame[frame["kind"] == "sae"] if hasattr(frame, "columns") else [r for r in frame if r["kind"] == "sae"]
    assert len(rows) == 256 + 256  # NaN entries kept, unranked
    (png,) = result.plot(tmp_path / "plots")
    assert png.name == "sae.png" and png.stat().st_size > 1000


def test_save_load_round_trip_with_the_sae_kind(tmp_path):
    model, tok = tiny_model(), word_tokenizer()
    result = locate(model, tok, PAIRS, method="attribution_patching", sae=two_sites(model), metric=metric)
    result.save(tmp_path / "result")
    loaded = LocalizationResult.load(tmp_path / "result", model)
    torch.testing.assert_close(loaded.scores["sae"], result.scores["sae"], rtol=0, atol=0, equal_nan=True)
    assert loaded.extra == result.extra and loaded.method == "attribution_patching"
    assert loaded.top("sae", 10) == result.top("sae", 10)
    assert loaded.select(top_k=5, kinds=("sae",)) == result.select(top_k=5, kinds=("sae",))
    for layer in (0, 1):
        got, want = latent_stats(loaded, layer), latent_stats(result, layer)
        assert all(torch.equal(got[k], want[k]) for k in want) and got["mean_positive"].shape == ((192, 256)[layer],)
    assert loaded.compare(result, k=10)["sae"]["spearman"] == pytest.approx(1.0)
    with pytest.raises(FingerprintMismatchError, match="different base model"):
        LocalizationResult.load(tmp_path / "result", tiny_model(seed=1))


def _site_with_layer(model, layer):
    site = msae.attach(tiny_sae(), model)
    return msae.SAESite(sae=site.sae, layer=layer, hook_name=site.hook_name)


BAD = {
    "sae kind without an SAE": (lambda m, s: dict(components=("sae",)), r"needs `sae=`.*load_sae"),
    "sae mixed with heads": (lambda m, s: dict(components=("heads", "sae"), sae=s), "scored on their own"),
    "sae with other kinds only": (lambda m, s: dict(components="neurons", sae=s), "scored on their own"),
    "unknown method for the kind": (
        lambda m, s: dict(method="ablation", sae=s),
        r"'ablation' does not score SAE.*mean_diff",
    ),
    "attention on latents": (lambda m, s: dict(method="attention", sae=s), "does not score SAE latents"),
    "hook beyond the model": (lambda m, s: dict(sae=tiny_sae(layer=5)), r"layer 5.*layers 0\.\.1.*another model"),
    "site at the wrong layer": (lambda m, s: dict(sae=_site_with_layer(m, 0)), r"reads the output of layer 1.*layer=0"),
    "SAE width": (lambda m, s: dict(sae=tiny_sae(d_in=64)), r"d_in=64.*d_model=128"),
    "not a residual hook": (
        lambda m, s: dict(sae=_hooked(tiny_sae(), "blocks.1.hook_mlp_out")),
        "not a residual-stream hook",
    ),
    "raw SAE without a hook": (
        lambda m, s: dict(sae=tiny_sae(hook=None)),
        r"no hook point.*load_sae\(sae, model, layer=L\)",
    ),
    "a folder path": (lambda m, s: dict(sae="runs/sae"), r"got str.*load_sae\(folder, model\)"),
    "two SAEs at one layer": (lambda m, s: dict(sae=[s, s]), "one SAE per layer"),
    "mean positions in patching": (
        lambda m, s: dict(method="attribution_patching", sae=s, positions="mean", metric=metric),
        r"`positions` must be one of \('last', 'all'\)",
    ),
    "unknown option": (lambda m, s: dict(sae=s, max_batch=4), r"unknown options \['max_batch'\]"),
    "only the attention sink": (
        lambda m, s: dict(sae=s, positions=[0]),
        r"positions=\[0\] select no token.*first token",
    ),
    "bad stat": (lambda m, s: dict(method="activation_stats", sae=s, stat="t"), "`stat` must be"),
}


def _hooked(sae, name):
    sae.cfg.metadata.hook_name = name
    return sae


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_locate_inputs_give_clear_errors(case):
    model, tok = tiny_model(), word_tokenizer()
    site = msae.attach(tiny_sae(), model)
    kwargs, message = BAD[case][0](model, site), BAD[case][1]
    kwargs.setdefault("method", "mean_diff")
    with pytest.raises(ValueError, match=message):
        locate(model, tok, PAIRS, progress=False, **kwargs)


def test_bad_selection_inputs_give_clear_errors():
    model, tok = tiny_model(), word_tokenizer()
    site = msae.attach(tiny_sae(), model)
    result = locate(model, tok, PAIRS, method="mean_diff", sae=site)
    with pytest.raises(ValueError, match="param_budget.*SAE latents have none"):
        result.select(param_budget=100, kinds=("sae",))
    with pytest.raises(ValueError, match=r"selected on their own: pass kinds=\('sae',\)"):
        result.select(top_k=3, kinds=("heads", "sae"))
    with pytest.raises(ValueError, match="takes a number or"):
        result.select(top_k={"heads": 3}, kinds=("sae",))
    with pytest.raises(ValueError, match="`sign` must be one of"):
        result.top("sae", 3, sign="up")
    other = msae.attach(tiny_sae(layer=0), model)
    with pytest.raises(ValueError, match=r"no latents at layer 0.*layers \[1\]"):
        msae.SAESteeringConfig.from_sae(other, result.select(top_k=3, kinds=("sae",)))
    heads = locate(model, tok, PAIRS, method="mean_diff", components=("heads",))
    with pytest.raises(ValueError, match="no 'sae' scores"):
        heads.select(top_k=3, kinds=("sae",))
    with pytest.raises(ValueError, match="holds no SAE latent scores"):
        latent_stats(heads)
    with pytest.raises(ValueError, match=r"no SAE was scored at layer 0"):
        latent_stats(result, 0)
    with pytest.raises(ValueError, match=r"scores\['sae'\] has shape \(3, 8\)"):
        LocalizationResult({"sae": torch.zeros(3, 8)}, result.spec, "m")


# ---- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sae-model")
    tiny_model().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_cli_sae_train_locate_and_explain(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MI_PEFT_CACHE", str(tmp_path / "cache"))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(f"w{(3 * j + i) % 80}" for i in range(40)) for j in range(40)))
    train = ["sae", "train", "--model", str(model_dir), "--texts", str(texts), "--layer", "1", "--width", "256"]
    train += ["--k", "8", "--tokens", "1400", "--epochs", "6", "--batch", "128", "--lr", "3e-3", "--eval-texts", "4"]
    assert main(train) == 0
    out = capsys.readouterr().out
    for phrase in ("fraction of variance unexplained", "L0 (active latents per token)", "dead latents",
                   "next-token loss increase", "SAESite(jumprelu SAE", "trained on 36 texts"):  # fmt: skip
        assert phrase in out
    cached = sorted((tmp_path / "cache" / "sae").iterdir())
    assert len(cached) == 1 and (cached[0] / "cfg.json").is_file() and f"cached in {cached[0]}" in out
    fvu = float(out.split("fraction of variance unexplained")[1].split()[0])
    assert 0 < fvu < 1

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"positive": p, "negative": n} for p, n in zip(POSITIVE, NEGATIVE, strict=True)]))
    loc = ["sae", "locate", "--model", str(model_dir), "--sae", str(cached[0]), "--data", str(pairs)]
    assert main([*loc, "--top", "4", "--sign", "positive", "--out", str(tmp_path / "loc")]) == 0
    out = capsys.readouterr().out
    result = LocalizationResult.load(tmp_path / "loc")
    assert result.kinds == ["sae"] and (tmp_path / "loc" / "sae.png").is_file()
    (layer, latent), score = result.top("sae", 1, sign="positive")[0]
    rows = [line.split() for line in out.splitlines()]
    assert "top 4 latents by positive score (mean_diff)" in out and [str(layer), str(latent), f"{score:+.4g}"] in [
        r[:3] for r in rows
    ]

    explain = ["sae", "explain", "--model", str(model_dir), "--sae", str(cached[0]), "--texts", str(texts)]
    assert main([*explain, "--latents", f"{latent},3", "--n-examples", "2"]) == 0
    out = capsys.readouterr().out
    assert f"**latent {latent}**" in out and "**latent 3**" in out

    assert main([*train[:7], "7", *train[8:]]) == 2  # layer 7 of a two-layer model
    assert "mi-peft sae: error" in capsys.readouterr().err
    assert main([*explain, "--latents", "x"]) == 2
