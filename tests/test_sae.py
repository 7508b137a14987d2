"""SAE features (issue #11): a tiny random Llama (d_model 128) and a tiny sae-lens SAE (d_sae 256).

Covers the issue's "Must show" list: hook placement equals mi_peft.capture's residual stream; the error term
keeps logits unchanged; clamping a latent to its own value changes nothing; steering by a latent equals
adding its decoder row; save/load round trips; clear errors for bad input; the example end to end.
sae-lens is a required test dependency here: without it these tests FAIL with the install command.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import load_script
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mi_peft import ContrastivePairs, capture
from mi_peft import sae as msae
from mi_peft.fingerprint import FingerprintMismatchError
from mi_peft.locate import LocalizationResult
from mi_peft.metrics import COMPLIANCE_TOKENS, REFUSAL_TOKENS

try:
    import sae_lens
except ImportError:  # the autouse fixture below turns this into a failure, not a skip
    sae_lens = None

REPO = Path(__file__).resolve().parents[1]
WORDS = ["<pad>", "<eos>", "<unk>", *REFUSAL_TOKENS, *COMPLIANCE_TOKENS, *(f"w{i}" for i in range(80))]
IDS = torch.tensor([[5, 30, 31, 32, 33, 34, 35, 36], [40, 41, 42, 43, 44, 45, 46, 47]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine thread contention makes them 10x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _needs_sae_lens():
    if sae_lens is None:
        pytest.fail(f"sae-lens is not installed; install it with: {msae.INSTALL}")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_sae(layer: int = 1, d_in: int = 128, d_sae: int = 256, hook: str | None = "post", seed: int = 0):
    """A JumpReLU SAE with random weights scaled so that a few dozen latents fire per token."""
    torch.manual_seed(seed)
    sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0)
        sae.W_dec.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.01)
        sae.b_enc.normal_(-0.5, 0.1)
        sae.threshold.fill_(0.2)
    if hook is not None:
        sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_{hook}"
    return sae


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_missing_sae_lens_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(ImportError, match=r"pip install 'mi-peft\[sae\]'"):
        msae.require_sae_lens()


@pytest.mark.parametrize(("hook", "sae_layer", "layer"), [("post", 0, 0), ("post", 1, 1), ("pre", 1, 0)])
def test_hook_placement_equals_the_residual_stream_captured_by_capture(hook, sae_layer, layer):
    model = tiny_model()
    site = msae.attach(tiny_sae(layer=sae_layer, hook=hook), model)
    assert site.layer == layer
    seen = []
    site.sae.hook_sae_input.add_hook(lambda x, hook: seen.append(x.detach().clone()))
    with capture.record(model, residual=[layer], positions="all") as cache, msae.intervene(model, site):
        model(input_ids=IDS)
    site.sae.reset_hooks()
    torch.testing.assert_close(seen[0], cache.residual[layer], rtol=0, atol=0)
    torch.testing.assert_close(msae.residual_at(model, layer, {"input_ids": IDS}), cache.residual[layer])


def test_training_activations_are_the_captured_residual_stream():
    model, tok = tiny_model(), word_tokenizer()
    texts = [" ".join(f"w{i}" for i in range(j, j + 9)) for j in range(4)]
    acts = msae.collect_activations(model, tok, texts, 1, n_tokens=10_000, progress=False)
    ids = torch.tensor([tok(t)["input_ids"] for t in texts])
    with capture.record(model, residual=[1], positions="all") as cache:
        model(input_ids=ids)
    torch.testing.assert_close(acts, cache.residual[1][:, 1:].flatten(0, 1))  # first token of each chunk left out


def test_error_term_leaves_logits_unchanged_when_no_latent_is_edited():
    model = tiny_model()
    site = msae.attach(tiny_sae(), model)
    assert (site.encode(msae.residual_at(model, 1, {"input_ids": IDS})) > 0).sum(-1).float().mean() > 5
    base = logits(model)
    with msae.intervene(model, site):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-5)
    with msae.intervene(model, site, edit=lambda f: f.clone()):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-5)
    with msae.intervene(model, site, error_term=False):
        assert (logits(model) - base).abs().max() > 1e-3  # the SAE really is in the forward


def test_clamping_a_latent_to_its_own_value_changes_nothing():
    model, sae = tiny_model(), tiny_sae()
    site = msae.attach(sae, model)
    one = IDS[:1, :1]
    acts = site.encode(msae.residual_at(model, 1, {"input_ids": one}))[0, 0]
    latent = int(acts.argmax())
    assert acts[latent] > 0
    base = logits(model, one)
    own = get_peft_model(model, msae.SAESteeringConfig.from_sae(site, [latent], op="clamp", value=float(acts[latent])))
    torch.testing.assert_close(logits(own, one), base, rtol=0, atol=1e-5)
    model = own.unload()
    # a latent that never fires on the batch, clamped to 0 at every position
    full = site.encode(msae.residual_at(model, 1, {"input_ids": IDS}))
    dead = int((full.amax((0, 1)) == 0).nonzero()[0])
    zero = get_peft_model(model, msae.SAESteeringConfig.from_sae(site, [dead], op="clamp", value=0.0))
    torch.testing.assert_close(logits(zero), logits(zero.unload()), rtol=0, atol=1e-5)


def test_clamp_adapter_equals_the_whole_sae_with_the_error_term():
    model = tiny_model()
    site = msae.attach(tiny_sae(), model)
    latents, values = [3, 17, 200], [2.0, 0.0, 1.5]

    def set_latents(f):
        f = f.clone()
        f[..., latents] = torch.tensor(values)
        return f

    with msae.intervene(model, site, edit=set_latents):
        expected = logits(model)
    clamped = get_peft_model(model, msae.SAESteeringConfig.from_sae(site, latents, op="clamp", value=values))
    torch.testing.assert_close(logits(clamped), expected, rtol=0, atol=1e-5)


def test_steering_by_a_latent_equals_adding_its_decoder_row():
    model = tiny_model()
    site = msae.attach(tiny_sae(), model)
    row = site.sae.W_dec[7].detach()
    with capture.edit(model, residual={1: lambda x: x + 3.0 * row}):
        expected = logits(model)
    with msae.intervene(model, site, edit=lambda f: f + 3.0 * torch.nn.functional.one_hot(torch.tensor(7), 256)):
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    steered = get_peft_model(model, msae.SAESteeringConfig.from_sae(site, 7, op="add", alpha=3.0))
    torch.testing.assert_close(logits(steered), expected, rtol=0, atol=1e-5)
    assert (logits(steered) - logits(steered.unload())).abs().max() > 1e-3


def test_adapter_save_load_round_trip(tmp_path):
    model = tiny_model()
    site = msae.attach(tiny_sae(), model)
    config = msae.SAESteeringConfig.from_sae(site, [5, 9], op="clamp", value={5: 1.0, 9: 0.5})
    steered = get_peft_model(model, config)
    expected = logits(steered)
    steered.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1]: tuple(v.shape) for k, v in saved.items()} == {
        "sae_decoder": (2, 128), "sae_encoder": (2, 128), "sae_encoder_bias": (2,), "sae_threshold": (2,),
        "sae_input_bias": (128,),
    }  # fmt: skip
    fresh = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)
    assert fresh.peft_config["default"].latents == [5, 9] and fresh.peft_config["default"].hook_name == site.hook_name
    with pytest.raises(FingerprintMismatchError, match="different base model"):
        PeftModel.from_pretrained(tiny_model(seed=1), tmp_path / "adapter")


def test_sae_and_latent_scores_save_load_round_trip(tmp_path):
    model, tok = tiny_model(), word_tokenizer()
    site = msae.attach(tiny_sae(), model)
    site.sae.save_model(tmp_path / "sae")
    again = msae.load_sae(tmp_path / "sae", model)
    x = msae.residual_at(model, 1, {"input_ids": IDS})
    torch.testing.assert_close(again.encode(x), site.encode(x), rtol=0, atol=0)
    pairs = ContrastivePairs(["w1 w2 w3", "w4 w5 w6 w7"], ["w8 w9", "w10 w11 w12"])
    scores = msae.locate_latents(model, tok, site, pairs, progress=False)
    scores.save(tmp_path / "scores")
    loaded = LocalizationResult.load(tmp_path / "scores", model)
    torch.testing.assert_close(loaded.scores["sae"], scores.scores["sae"], rtol=0, atol=0, equal_nan=True)
    assert loaded.top("sae", 5) == scores.top("sae", 5) and loaded.data_hash == pairs.data_hash()
    assert msae.latent_stats(loaded).keys() == msae.latent_stats(scores).keys()
    with pytest.raises(FingerprintMismatchError):
        LocalizationResult.load(tmp_path / "scores", tiny_model(seed=1))


@pytest.mark.parametrize("positions", ["last", "mean", "all"])
def test_locate_latents_is_the_mean_activation_difference(positions):
    """mean_diff of the "sae" kind: mean latent activation on positive minus negative prompts, per prompt
    ("last", "mean") or pooled over tokens ("all"); each prompt's first token is left out unless it is alone."""
    model, tok = tiny_model(), word_tokenizer()
    site = msae.attach(tiny_sae(), model)
    pos, neg = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w9"], ["w10 w11", "w12 w13 w14", "w15 w16 w17 w18"]
    result = msae.locate_latents(model, tok, site, ContrastivePairs(pos, neg), positions=positions, batch_size=2)

    def side(texts):
        rows = []
        for t in texts:
            f = site.encode(msae.residual_at(model, 1, {"input_ids": torch.tensor([tok(t)["input_ids"]])}))[0]
            read = f[1:] if len(f) > 1 else f
            rows.append(f[-1:] if positions == "last" else read.mean(0, keepdim=True) if positions == "mean" else read)
        return torch.cat(rows).mean(0)

    assert result.method == "mean_diff" and torch.isnan(result.scores["sae"][0]).all()  # no SAE reads layer 0
    torch.testing.assert_close(result.scores["sae"][1], side(pos) - side(neg), rtol=1e-5, atol=1e-5)
    stats = msae.latent_stats(result)
    torch.testing.assert_close(stats["mean_positive"] - stats["mean_negative"], result.scores["sae"][1])
    assert 0 < float(stats["freq_positive"].max()) <= 1
    top = result.top("sae", 3, sign="positive")
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    assert top[0] == ((1, int(result.scores["sae"][1].argmax())), pytest.approx(float(result.scores["sae"][1].max())))


def test_explain_latents_finds_the_top_activating_tokens():
    model, tok = tiny_model(), word_tokenizer()
    site = msae.attach(tiny_sae(), model)
    texts = [" ".join(f"w{(7 * j + i) % 80}" for i in range(10)) for j in range(6)]
    acts = torch.cat(  # every token but each text's first (the attention sink)
        [
            site.encode(msae.residual_at(model, 1, {"input_ids": torch.tensor([tok(t)["input_ids"]])}))[0, 1:]
            for t in texts
        ]
    )
    latent = int(acts.amax(0).argmax())
    (e,) = msae.explain_latents(model, tok, site, [latent], texts, n_examples=3, progress=False)
    assert e.max_activation == pytest.approx(float(acts[:, latent].max()), rel=1e-5)
    assert e.contexts[0][2] == pytest.approx(e.max_activation, rel=1e-5)
    assert e.frequency == pytest.approx(float((acts[:, latent] > 0).float().mean()))
    assert len(e.promoted) == 5 and f"latent {latent}" in e.render()


def test_train_sae_with_the_sae_lens_trainer_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PEFT_CACHE", str(tmp_path))
    model, tok = tiny_model(), word_tokenizer()
    texts = [" ".join(f"w{(3 * j + i) % 80}" for i in range(40)) for j in range(60)]
    kwargs = dict(layer=1, d_sae=256, k=8, tokens=1200, epochs=3, batch=128, progress=False)
    site = msae.train_sae(model, tok, texts, **kwargs)
    assert site.sae.cfg.architecture() == "jumprelu" and site.hook_name == "blocks.1.hook_resid_post"
    stats = msae.reconstruction_stats(model, tok, site, texts[:6])
    assert 0 < stats.fvu < 1 and 0 < stats.l0 < 64 and stats.ce_sae >= 0
    cached = msae.train_sae(model, tok, texts, **kwargs)  # loaded from $MI_PEFT_CACHE/sae, not retrained
    assert torch.equal(cached.sae.W_dec, site.sae.W_dec.cpu())
    assert len(list((tmp_path / "sae").iterdir())) == 1


BAD = {
    "latent out of range": (lambda m, s: msae.SAESteeringConfig.from_sae(s, [256]), r"latents 0\.\.255"),
    "negative latent": (lambda m, s: s.check_latents([-1]), r"latents 0\.\.255"),
    "explain unknown latent": (
        lambda m, s: msae.explain_latents(m, word_tokenizer(), s, [999], ["w1 w2"], progress=False),
        r"latent index 999 is out of range",
    ),
    "width": (lambda m, s: msae.attach(tiny_sae(d_in=64), m), r"d_in=64.*d_model=128.*train_sae"),
    "not a residual hook": (
        lambda m, s: msae.attach(_with_hook(tiny_sae(), "blocks.0.hook_mlp_out"), m),
        "not a residual-stream hook",
    ),
    "hook layer beyond the model": (lambda m, s: msae.attach(tiny_sae(layer=5), m), r"layers 0\.\.1"),
    "conflicting layer": (lambda m, s: msae.attach(tiny_sae(layer=1), m, layer=0), "pass layer=1"),
    "no hook, no layer": (lambda m, s: msae.attach(tiny_sae(hook=None), m), "pass `layer=L`"),
    "NaN weights": (lambda m, s: msae.attach(_nan(tiny_sae()), m), r"NaN or infinite values in 'W_dec'.*Retrain"),
    "clamp on TopK": (
        lambda m, s: msae.SAESteeringConfig.from_sae(_topk(m), [1], op="clamp", value=1.0),
        "Use op='add'",
    ),
    "clamp without value": (lambda m, s: msae.SAESteeringConfig.from_sae(s, [1], op="clamp"), "`value` is needed"),
    "alpha count": (lambda m, s: msae.SAESteeringConfig.from_sae(s, [1, 2], alpha=[1.0]), "one per latent"),
    "missing folder": (lambda m, s: msae.load_sae("/nonexistent/sae", m), "cfg.json missing"),
    "config without rows": (
        lambda m, s: logits(get_peft_model(m, msae.SAESteeringConfig(layer=1, latents=[1], alpha=[1.0]))),
        r"no decoder rows.*from_sae",
    ),
    "adapter on a narrower model": (
        lambda m, s: get_peft_model(_narrow(), msae.SAESteeringConfig.from_sae(s, [1], ignore_fingerprint=True)),
        r"128 entries.*d_model=64",
    ),
}


def _narrow():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _with_hook(sae, name):
    sae.cfg.metadata.hook_name = name
    return sae


def _nan(sae):
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    return sae


def _topk(model):
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=128, d_sae=256, k=4))
    return msae.attach(sae, model, layer=1)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_clear_errors(case):
    call, message = BAD[case]
    model = tiny_model()
    site = msae.attach(tiny_sae(), model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call(model, site)


def test_example_runs_end_to_end_at_tiny_size(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PEFT_CACHE", str(tmp_path / "cache"))
    tiny_model().save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    example = load_script(REPO / "examples" / "06_sae_features.py")
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "model"), "--out", str(out), "--width", "256", "--k", "8", "--tokens", "1500"]
    argv += ["--epochs", "2", "--pairs", "4", "--eval-prompts", "4", "--eval-texts", "2", "--multipliers", "1", "4"]
    result = example.main(argv)
    assert len(result["top"]) == 5 and len(result["explanations"]) == 5
    assert {r["method"] for r in result["steering"]["rows"]} == {
        "SAE add (top-5 latents)", "SAE clamp (top-5 latents)", "diff-in-means",
    }  # fmt: skip
    assert all(abs(r["metric_shift"]) < 1e6 for r in result["steering"]["rows"])
    assert {p.name for p in out.iterdir()} >= {"summary.md", "sae_features.png", "results.json", "latent_scores"}
    assert "fraction of variance unexplained" in (out / "summary.md").read_text()
