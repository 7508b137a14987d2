"""Metrics: token-set logit differences, completion log-probabilities, choice probabilities, name resolution."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mi_peft.data import ContrastivePairs
from mi_peft.metrics import (
    COMPLIANCE_TOKENS,
    METRICS,
    REFUSAL_TOKENS,
    choice_prob,
    completion_logprob,
    get_metric,
    logit_diff,
    metric_name,
    refusal_metric,
    token_ids,
)

REFUSAL_DIR = Path(__file__).resolve().parents[1] / "recipes" / "data" / "refusal"


class DictTokenizer:
    """BPE-like toy: each word (with its leading space) is one id if known, else one id per character."""

    def __init__(self, words: list[str]):
        chars = sorted({c for w in words for c in w} | set("AB "))
        self.vocab = {t: i for i, t in enumerate(dict.fromkeys(chars + words))}
        self.inverse = {i: t for t, i in self.vocab.items()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for piece in re.findall(r" ?\S+| ", text):
            ids += [self.vocab[piece]] if piece in self.vocab else [self.vocab[c] for c in piece]
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.inverse[i] for i in ids)


WORDS = ["Sure", " Sure", "Here", "No", " No", "Yes", "Hello", " world"]
WORDS += [t for t in REFUSAL_TOKENS + COMPLIANCE_TOKENS if t not in WORDS]


@pytest.fixture
def tok() -> DictTokenizer:
    return DictTokenizer(WORDS)


def _logits(tok: DictTokenizer, rows: list[dict[str, float]], seq: int = 3) -> torch.Tensor:
    """[batch, seq, vocab] zeros, with the given token logits at the last position of each row."""
    out = torch.zeros(len(rows), seq, len(tok.vocab))
    for b, row in enumerate(rows):
        for token, value in row.items():
            out[b, -1, tok.vocab[token]] = value
    return out


def test_token_ids_first_token_and_single_token_space_variants(tok):
    assert token_ids(tok, ["Sure"]) == sorted([tok.vocab["Sure"], tok.vocab[" Sure"]])
    assert token_ids(tok, [" Sure", "Sure"]) == sorted([tok.vocab["Sure"], tok.vocab[" Sure"]])  # deduplicated
    assert token_ids(tok, ["Here"]) == [tok.vocab["Here"]]  # " Here" is two tokens: a fragment, not added
    assert token_ids(tok, ["Hey"]) == [tok.vocab["H"]]  # first token of a multi-token string
    with pytest.raises(ValueError, match="non-empty list"):
        token_ids(tok, [])
    with pytest.raises(ValueError, match="non-empty list"):
        token_ids(tok, "Sure")
    with pytest.raises(ValueError, match="'' in `tokens` encodes to no tokens"):
        token_ids(tok, ["Sure", ""])


def test_logit_diff_is_logsumexp_difference_at_last_position(tok):
    metric = logit_diff(tok, ["Yes"], ["No"])
    logits = _logits(tok, [{"Yes": 2.0, "No": 0.5}, {"Yes": -1.0, " No": 3.0}])
    logits[:, 0] = 100.0  # earlier positions are ignored
    yes, no = token_ids(tok, ["Yes"]), token_ids(tok, ["No"])
    expected = logits[:, -1, yes].logsumexp(-1) - logits[:, -1, no].logsumexp(-1)
    torch.testing.assert_close(metric(logits, {}), expected)
    assert metric(logits, {})[0] > 0 > metric(logits, {})[1]
    assert metric_name(metric) == "logit_diff(Yes vs No)"


def test_logit_diff_gradient_flows(tok):
    logits = _logits(tok, [{"Yes": 1.0}]).requires_grad_(True)
    logit_diff(tok, ["Yes"], ["No"])(logits, {}).sum().backward()
    assert logits.grad[0, -1, tok.vocab["Yes"]] > 0 and logits.grad[0, -1, tok.vocab["No"]] < 0


def test_logit_diff_validation(tok):
    with pytest.raises(ValueError, match="`negative_tokens` must be a non-empty list"):
        logit_diff(tok, ["Yes"], [])
    with pytest.raises(ValueError, match="in both `positive_tokens` and `negative_tokens`"):
        logit_diff(tok, ["Sure"], [" Sure"])
    metric = logit_diff(tok, ["Yes"], ["No"])
    with pytest.raises(ValueError, match="outside the logits' vocabulary"):
        metric(torch.zeros(1, 2, 3), {})
    with pytest.raises(ValueError, match=r"must be \[batch, pos, vocab\]"):
        metric(torch.zeros(2, len(tok.vocab)), {})


def test_refusal_metric_direction(tok):
    metric = refusal_metric(tok)
    logits = _logits(tok, [{"Sorry": 5.0}, {"Sure": 5.0}])
    scores = metric(logits, {})
    assert scores[0] > 0 > scores[1]
    assert metric_name(metric) == "refusal"


def test_completion_logprob_sums_completion_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    scores = completion_logprob()(logits, {"input_ids": ids, "completion_mask": mask})
    lp = logits.log_softmax(-1)
    expected = torch.stack(
        [sum(lp[b, t - 1, ids[b, t]] for t in range(1, 5) if mask[b, t]) for b in range(2)]  # token t from t - 1
    )
    torch.testing.assert_close(scores, expected)
    assert metric_name(completion_logprob()) == "logprob"
    with pytest.raises(ValueError, match="completion_mask"):
        completion_logprob()(logits, {"input_ids": ids})


def test_choice_prob(tok):
    metric = choice_prob(tok, ("A", "B"), target=1)
    logits = _logits(tok, [{"A": 0.0, "B": 0.0}, {"A": 0.0, "B": 2.0}, {"A": 0.0, "B": 0.0, "Sure": 9.0}])
    torch.testing.assert_close(metric(logits, {}), torch.tensor([0.5, torch.tensor(2.0).sigmoid().item(), 0.5]))
    both = choice_prob(tok, ("A", "B"), 0)(logits, {}) + metric(logits, {})
    torch.testing.assert_close(both, torch.ones(3))
    assert metric_name(metric) == "choice(B of A|B)"
    with pytest.raises(ValueError, match="`target` must be an index in"):
        choice_prob(tok, ("A", "B"), target=2)
    with pytest.raises(ValueError, match="at least two"):
        choice_prob(tok, ("A",))
    with pytest.raises(ValueError, match="share first tokens"):
        choice_prob(tok, ("Sure", " Sure"))


def test_get_metric_resolves_names_and_passes_callables(tok):
    assert metric_name(get_metric(None, tok)) == "refusal"
    assert metric_name(get_metric("refusal", tok)) == "refusal"
    assert metric_name(get_metric("logprob", tok)) == "logprob"
    assert metric_name(get_metric("choice", tok, choices=("A", "B"), target=1)) == "choice(B of A|B)"
    assert metric_name(get_metric("logit_diff", tok, positive_tokens=["Yes"], negative_tokens=["No"])).startswith(
        "logit_diff"
    )

    def my_metric(logits, batch):
        return logits[:, -1, 0]

    assert get_metric(my_metric, tok) is my_metric
    assert metric_name(my_metric) == "my_metric"
    assert metric_name(lambda logits, batch: logits[:, -1, 0]) == "custom"


METRIC_ARGS = {
    "refusal": {},
    "logit_diff": {"positive_tokens": ["Yes"], "negative_tokens": ["No"]},
    "logprob": {},
    "choice": {"choices": ("A", "B"), "target": 0},
}


@pytest.mark.parametrize("name", METRICS)
def test_every_metric_name_builds_a_working_metric(tok, name):
    metric = get_metric(name, tok, **METRIC_ARGS[name])
    assert metric_name(metric).startswith(name)
    torch.manual_seed(0)
    logits = torch.randn(4, 6, len(tok.vocab), requires_grad=True)
    batch = {
        "input_ids": torch.randint(0, len(tok.vocab), (4, 6)),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 1]] * 4),
    }
    scores = metric(logits, batch)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert scores.unique().numel() > 1  # depends on each row's logits, not a constant
    (grad,) = torch.autograd.grad(scores.sum(), logits)
    assert grad.abs().sum() > 0


def test_get_metric_errors(tok):
    with pytest.raises(ValueError, match=r"unknown metric 'refusl'; valid names: \['refusal', 'logit_diff'"):
        get_metric("refusl", tok)
    with pytest.raises(ValueError, match="needs `positive_tokens=` and `negative_tokens=`"):
        get_metric("logit_diff", tok, positive_tokens=["Yes"])
    with pytest.raises(ValueError, match=r"does not take \['target'\]"):
        get_metric("refusal", tok, target=1)
    with pytest.raises(ValueError, match="only apply to metric names"):
        get_metric(lambda logits, batch: logits[:, -1, 0], tok, target=1)
    with pytest.raises(ValueError, match="must be a name"):
        get_metric(3, tok)


@pytest.mark.slow
def test_refusal_metric_separates_harmful_from_harmless_on_embedded_model(embedded):
    """On held-out prompts, the embedded model's refusal score is higher for harmful than for harmless requests."""
    model, tokenizer = embedded
    pairs = ContrastivePairs.load(REFUSAL_DIR, split="test").subset(8, seed=0)
    metric = get_metric("refusal", tokenizer)
    pos, neg = next(pairs.batches(tokenizer, batch_size=8))
    with torch.no_grad():
        harmful = metric(model(**pos, logits_to_keep=1).logits, pos)  # last-position metric: one logit row suffices
        harmless = metric(model(**neg, logits_to_keep=1).logits, neg)
    assert harmful.shape == harmless.shape == (8,)
    assert harmful.mean() > harmless.mean() + 0.5, (harmful.tolist(), harmless.tolist())
