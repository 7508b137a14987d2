"""General-ability side effects: PIQA, BLiMP and held-out text perplexity, on plain (non-chat) text.

A behaviour edit should not cost the model its common sense, grammar or fluency. Three cheap probes,
all scored from log-likelihoods (no generation, no chat template, BOS added exactly as
``mi_peft.evaluate._batching.encode`` adds it):

- :func:`piqa_accuracy`: PIQA (Bisk et al. 2020), two solutions per goal; the prompt is
  ``"Question: {goal}\\nAnswer:"`` and each solution ``" " + sol`` is scored by its **mean log-probability
  per token** (total log-likelihood divided by the solution's token count). lm-evaluation-harness's
  ``acc_norm`` divides by the solution's length in bytes instead; both remove the bias towards short
  answers, so numbers are close but not identical. The unnormalised (total log-likelihood) accuracy is
  returned too.
- :func:`blimp_accuracy`: BLiMP (Warstadt et al. 2020) minimal pairs; a pair is right when the
  grammatical sentence gets the strictly higher total log-probability.
- :func:`text_perplexity`: perplexity of WikiText-2 test paragraphs, via
  :func:`mi_peft.evaluate.perplexity`.

The defaults read the copies in ``recipes/data/general`` (see its SOURCE.md for sources and licenses).

Why not lm-evaluation-harness: ``pip install --dry-run lm-eval`` (0.4.13) leaves torch, transformers,
peft, trl and datasets alone but adds 37 packages (scikit-learn, scipy, nltk, sacrebleu, rouge_score,
evaluate, aiohttp, lxml, ...) to score three tasks; its PIQA and BLiMP task definitions load their data
from the Hugging Face Hub, so offline use needs custom task YAML files pointing at local copies; and it
normalises PIQA by bytes rather than tokens. The few functions below (one continuation log-likelihood
routine on the existing right-padded batching) cover what is needed with no new dependency.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..stats import wilson_interval
from ._batching import batches, check_positive, check_texts, encode, forward_logits, pad, pad_id
from .side_effects import perplexity

PIQA_TEMPLATE = "Question: {goal}\nAnswer:"
# Defaults sized for ~20 s per model on 2 CPU cores with the embedded 135M model (single-thread CPU time
# measured: 0.41 s per PIQA goal, 0.094 s per BLiMP pair, 4 ms per perplexity token).
PIQA_N = 32
BLIMP_N_PER_PHENOMENON = 1
PPL_N_TEXTS = 4
PPL_MAX_LENGTH = 128


def general_data_dir() -> Path:
    """``recipes/data/general``, in a checkout or inside the installed package."""
    from ..recipe import shipped_recipes_dir

    return shipped_recipes_dir() / "data" / "general"


def _prefix_id(tokenizer: Any) -> int:
    """Token that stands before a text with no context, so its first token can be scored (lm-eval's rule)."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "an empty context leaves the first token without a prediction, and the tokenizer adds no BOS and has "
        "neither `bos_token_id` nor `eos_token_id`; set `tokenizer.bos_token` or pass a non-empty context."
    )


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """Ids of ``context + continuation`` and the index of the first continuation token.

    As in lm-evaluation-harness, trailing spaces of the context move to the continuation, the whole
    text is encoded once and the continuation is what follows the context's own encoding.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = encode(tokenizer, stripped)  # an empty context: just the BOS the tokenizer adds, if any
    whole = encode(tokenizer, stripped + continuation)
    if not context_ids:
        prefix = _prefix_id(tokenizer)
        context_ids, whole = [prefix], [prefix, *whole]
    if len(whole) <= len(context_ids):
        raise ValueError(f"continuation {continuation!r} adds no tokens after context {context!r:.80}.")
    return whole, len(context_ids)


def continuation_logprobs(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 16,
    desc: str = "log-likelihood",
) -> tuple[list[float], list[int]]:
    """Total log-probability (nats) of each continuation given its context, and its token count.

    Right-padded batches of similar lengths (padding never changes a score); log-softmax in float64.
    An empty context scores every token of the continuation after BOS (or, if the tokenizer adds
    none, after its BOS/EOS id).
    """
    check_positive(batch_size, "batch_size")
    contexts = check_texts(contexts, "contexts")
    continuations = check_texts(continuations, "continuations")
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations; pass one per item.")
    encoded = [_encode_pair(tokenizer, c, x) for c, x in zip(contexts, continuations, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    totals, counts = [0.0] * len(encoded), [0] * len(encoded)
    slices = list(batches(len(order), batch_size))
    for sl in tqdm(slices, desc=desc, leave=False, disable=len(slices) < 2):
        rows = order[sl]
        input_ids, attention_mask = pad([encoded[i][0] for i in rows], pad_id(tokenizer), side="right")
        logits = forward_logits(model, input_ids, attention_mask)
        for row, item in enumerate(rows):
            ids, start = encoded[item]
            targets = input_ids[row, start : len(ids)].to(logits.device)
            logp = logits[row, start - 1 : len(ids) - 1].double().log_softmax(-1)
            totals[item] = float(logp.gather(-1, targets[:, None]).sum())
            counts[item] = len(ids) - start
    return totals, counts


def _check_count(value: Any, name: str, available: int, source: Path) -> int:
    check_positive(value, name)
    if value > available:
        raise ValueError(f"`{name}={value}` but {source} has only {available}; pass at most {available}.")
    return value


def _rate_interval(accuracy: float, n: int, confidence: float) -> tuple[float, float]:
    return wilson_interval(round(accuracy * n), n, confidence)


@dataclass
class PiqaResult:
    """``accuracy``: share of goals whose correct solution has the higher mean log-prob per token;
    ``accuracy_total``: the same with total log-probability; per item: ``labels`` / ``predictions``
    (0 = sol1, ties go to sol1), ``mean_logprobs`` and ``logprobs`` ``(sol1, sol2)``, ``n_tokens``."""

    accuracy: float
    accuracy_total: float
    n: int
    labels: list[int]
    predictions: list[int]
    mean_logprobs: list[tuple[float, float]]
    logprobs: list[tuple[float, float]]
    n_tokens: list[tuple[int, int]]

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson interval of ``accuracy``."""
        return _rate_interval(self.accuracy, self.n, confidence)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_piqa(n: int | None = None, data_dir: str | os.PathLike | None = None) -> list[tuple[str, str, str, int]]:
    """``(goal, sol1, sol2, label)`` rows of PIQA validation (``valid.jsonl`` + ``valid-labels.lst``)."""
    folder = Path(data_dir) if data_dir is not None else general_data_dir() / "piqa"
    rows_path, labels_path = folder / "valid.jsonl", folder / "valid-labels.lst"
    for path in (rows_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; pass `data_dir=` a folder with valid.jsonl and valid-labels.lst."
            )
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [int(line) for line in labels_path.read_text(encoding="utf-8").split()]
    if len(rows) != len(labels) or any(label not in (0, 1) for label in labels):
        raise ValueError(f"{labels_path} must hold one 0/1 label per row of {rows_path} ({len(rows)} rows).")
    n = len(rows) if n is None else _check_count(n, "n", len(rows), rows_path)
    return [(r["goal"], r["sol1"], r["sol2"], label) for r, label in zip(rows[:n], labels[:n], strict=True)]


def piqa_accuracy(
    model: nn.Module,
    tokenizer: Any,
    n: int = PIQA_N,
    batch_size: int = 16,
    data_dir: str | os.PathLike | None = None,
) -> PiqaResult:
    """Accuracy on the first ``n`` PIQA validation goals, choosing by mean log-prob per solution token.

    Example:
        >>> piqa_accuracy(peft_model, tok, n=100).accuracy  # chance is 0.5
    """
    rows = load_piqa(n, data_dir)
    contexts = [PIQA_TEMPLATE.format(goal=goal) for goal, _, _, _ in rows for _ in range(2)]
    continuations = [" " + sol for _, sol1, sol2, _ in rows for sol in (sol1, sol2)]
    totals, counts = continuation_logprobs(model, tokenizer, contexts, continuations, batch_size, desc="piqa")
    logprobs = list(zip(totals[0::2], totals[1::2], strict=True))
    n_tokens = list(zip(counts[0::2], counts[1::2], strict=True))
    means = [(a / na, b / nb) for (a, b), (na, nb) in zip(logprobs, n_tokens, strict=True)]
    labels = [label for *_, label in rows]
    predictions = [int(b > a) for a, b in means]
    by_total = [int(b > a) for a, b in logprobs]
    return PiqaResult(
        accuracy=sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(rows),
        accuracy_total=sum(p == y for p, y in zip(by_total, labels, strict=True)) / len(rows),
        n=len(rows),
        labels=labels,
        predictions=predictions,
        mean_logprobs=means,
        logprobs=logprobs,
        n_tokens=n_tokens,
    )


@dataclass
class BlimpResult:
    """``accuracy`` over all pairs and ``per_phenomenon`` (BLiMP ``UID``); per pair: ``phenomena``,
    ``good_logprobs`` and ``bad_logprobs`` (total log-probability of each sentence, nats)."""

    accuracy: float
    n: int
    per_phenomenon: dict[str, float]
    phenomena: list[str] = field(default_factory=list)
    good_logprobs: list[float] = field(default_factory=list)
    bad_logprobs: list[float] = field(default_factory=list)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson interval of ``accuracy`` (pairs treated as independent)."""
        return _rate_interval(self.accuracy, self.n, confidence)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_blimp(
    n_per_phenomenon: int | None = None,
    phenomena: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
) -> list[tuple[str, str, str]]:
    """``(phenomenon, sentence_good, sentence_bad)``: the first ``n_per_phenomenon`` pairs of each phenomenon."""
    source = Path(path) if path is not None else general_data_dir() / "blimp.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found; pass `path=` a BLiMP .jsonl file.")
    grouped: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            grouped[row["UID"]].append((row["UID"], row["sentence_good"], row["sentence_bad"]))
    chosen = sorted(grouped) if phenomena is None else check_texts(phenomena, "phenomena")
    unknown = [p for p in chosen if p not in grouped]
    if unknown:
        raise ValueError(f"unknown BLiMP phenomena {unknown}; {source} has: {', '.join(sorted(grouped))}.")
    smallest = min(len(grouped[p]) for p in chosen)
    n = smallest if n_per_phenomenon is None else _check_count(n_per_phenomenon, "n_per_phenomenon", smallest, source)
    return [pair for p in chosen for pair in grouped[p][:n]]


def blimp_accuracy(
    model: nn.Module,
    tokenizer: Any,
    n_per_phenomenon: int = BLIMP_N_PER_PHENOMENON,
    phenomena: Sequence[str] | None = None,
    batch_size: int = 32,
    path: str | os.PathLike | None = None,
) -> BlimpResult:
    """Share of BLiMP pairs whose grammatical sentence gets the strictly higher total log-probability.

    Example:
        >>> blimp_accuracy(peft_model, tok, n_per_phenomenon=5).per_phenomenon["passive_1"]
    """
    pairs = load_blimp(n_per_phenomenon, phenomena, path)
    sentences = [s for _, good, bad in pairs for s in (good, bad)]
    totals, _ = continuation_logprobs(model, tokenizer, [""] * len(sentences), sentences, batch_size, desc="blimp")
    good, bad = totals[0::2], totals[1::2]
    correct: dict[str, list[bool]] = defaultdict(list)
    for (phenomenon, _, _), g, b in zip(pairs, good, bad, strict=True):
        correct[phenomenon].append(g > b)
    hits = [hit for values in correct.values() for hit in values]
    return BlimpResult(
        accuracy=sum(hits) / len(hits),
        n=len(hits),
        per_phenomenon={p: sum(v) / len(v) for p, v in correct.items()},
        phenomena=[p for p, _, _ in pairs],
        good_logprobs=good,
        bad_logprobs=bad,
    )


def load_paragraphs(path: str | os.PathLike | None = None, n_texts: int | None = None) -> list[str]:
    """Non-empty, non-heading lines (WikiText paragraphs) of a text file, in file order, stripped."""
    source = Path(path) if path is not None else general_data_dir() / "wikitext2_test_excerpt.txt"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found; pass a text file path or a list of texts.")
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    paragraphs = [line for line in lines if line and not (line.startswith("= ") and line.endswith(" ="))]
    if not paragraphs:
        raise ValueError(f"{source} has no paragraphs (only blank lines and ' = Heading = ' lines).")
    return paragraphs if n_texts is None else paragraphs[: _check_count(n_texts, "n_texts", len(paragraphs), source)]


def text_perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts_or_path: Sequence[str] | str | os.PathLike | None = None,
    n_texts: int | None = PPL_N_TEXTS,
    max_length: int = PPL_MAX_LENGTH,
    batch_size: int = 8,
) -> float:
    """Perplexity on held-out neutral text: a list of texts, or a text file's paragraphs (default: WikiText-2).

    A ``str`` is a file path (pass ``[text]`` to score one text). File paragraphs are used as they are
    (WikiText's tokenised form, ``<unk>`` included), so compare numbers only on the same texts; each
    keeps its first ``max_length`` tokens; ``n_texts`` keeps the first paragraphs (``None``: all).
    """
    if texts_or_path is None or isinstance(texts_or_path, (str, os.PathLike)):
        texts = load_paragraphs(texts_or_path, n_texts)
    else:
        texts = check_texts(texts_or_path, "texts_or_path")
    return perplexity(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)


@dataclass
class GeneralAbility:
    """PIQA, BLiMP and perplexity results of one model, with the seconds each took."""

    piqa: PiqaResult
    blimp: BlimpResult
    perplexity: float
    seconds: dict[str, float]

    def to_dict(self, confidence: float = 0.95) -> dict[str, Any]:
        """Flat numbers for a report: accuracies with ``n`` and Wilson bounds, perplexity, seconds."""
        out: dict[str, Any] = {}
        for name, result in (("piqa", self.piqa), ("blimp", self.blimp)):
            low, high = result.interval(confidence)
            out.update({f"{name}_accuracy": result.accuracy, f"{name}_n": result.n})
            out.update({f"{name}_low": low, f"{name}_high": high})
        out["perplexity"] = self.perplexity
        out.update({f"seconds_{k}": v for k, v in self.seconds.items()})
        return out


def general_ability(
    model: nn.Module,
    tokenizer: Any,
    piqa_n: int = PIQA_N,
    blimp_n: int = BLIMP_N_PER_PHENOMENON,
    ppl_texts: Sequence[str] | str | os.PathLike | None = None,
    ppl_n_texts: int | None = PPL_N_TEXTS,
    batch_size: int = 16,
) -> GeneralAbility:
    """PIQA accuracy (``piqa_n`` goals), BLiMP accuracy (``blimp_n`` pairs per phenomenon) and perplexity.

    ``ppl_texts``: as ``texts_or_path`` of :func:`text_perplexity` (``ppl_n_texts`` applies to files only).
    The defaults (32 goals, 67 pairs, 4 paragraphs of <= 128 tokens) cost about 21 s of single-thread CPU
    time on the embedded SmolLM2-135M-Instruct; raise them when time allows (PIQA's 95% interval is still
    about +-0.16 wide at n=32).

    Example:
        >>> general_ability(peft_model, tok).to_dict()
        >>> with peft_model.disable_adapter():
        ...     base = general_ability(peft_model, tok)
    """
    seconds: dict[str, float] = {}
    steps = tqdm(total=3, desc="general ability", leave=False)
    start = time.perf_counter()
    piqa = piqa_accuracy(model, tokenizer, n=piqa_n, batch_size=batch_size)
    seconds["piqa"], start = time.perf_counter() - start, time.perf_counter()
    steps.update()
    blimp = blimp_accuracy(model, tokenizer, n_per_phenomenon=blimp_n, batch_size=2 * batch_size)
    seconds["blimp"], start = time.perf_counter() - start, time.perf_counter()
    steps.update()
    ppl = text_perplexity(model, tokenizer, ppl_texts, n_texts=ppl_n_texts, batch_size=max(1, batch_size // 2))
    seconds["perplexity"] = time.perf_counter() - start
    steps.update()
    steps.close()
    return GeneralAbility(piqa=piqa, blimp=blimp, perplexity=ppl, seconds=seconds)
