"""Explain SAE latents: the tokens and short contexts that activate them most, and the tokens they promote.

A latent is only as useful as its reading: before steering with latent 1203, look at where it fires.
:func:`explain_latents` runs a text sample once, keeps a running top-n per latent (vectorised over the
chosen latents) and decodes the winning positions with a few tokens of context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import spec_for
from ..data import check_positive, check_texts, encode, left_padded_batch
from ..locate.sae_kind import LatentSet
from .site import SAESite, latent_acts, sae_positions


@dataclass
class LatentExplanation:
    """What one latent responds to on a text sample.

    Args:
        latent: SAE latent index. max_activation: largest activation seen. frequency: fraction of tokens where it fires.
        top_tokens: distinct tokens with the highest activation, ``(token, activation)``.
        contexts: ``(text before, token, activation)`` of the highest-activating positions.
        promoted: tokens whose logits the latent's decoder row raises most (through final norm and unembedding).
    """

    latent: int
    max_activation: float
    frequency: float
    top_tokens: list[tuple[str, float]]
    contexts: list[tuple[str, str, float]]
    promoted: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """One markdown block: frequency, top tokens, promoted tokens and the contexts."""
        tokens = ", ".join(f"`{_show(t)}` {a:.3g}" for t, a in self.top_tokens) or "(never fires)"
        lines = [
            f"**latent {self.latent}** (max {self.max_activation:.3g}, fires on {100 * self.frequency:.2f}% of tokens)",
            f"- top tokens: {tokens}",
            f"- promotes: {', '.join(f'`{_show(t)}`' for t in self.promoted)}",
        ]
        lines += [f"- {a:.3g}: `…{_show(before)}[[{_show(token)}]]`" for before, token, a in self.contexts]
        return "\n".join(lines)


def _show(text: str) -> str:
    """Text for a markdown code span: newlines and backticks made visible, spaces kept."""
    return text.replace("\n", "⏎").replace("`", "'")


def _promoted(model: nn.Module, site: SAESite, latents: list[int], tokenizer: Any, n: int) -> list[list[str]]:
    """Top ``n`` tokens of each latent's decoder row read through the final norm weight and the unembedding."""
    spec = spec_for(model)
    unembed = spec.unembed_module(model).weight.detach().float()
    rows = site.sae.W_dec[torch.tensor(latents, device=site.sae.W_dec.device)].detach().float().to(unembed.device)
    gamma = getattr(spec.final_norm_module(model), "weight", None)
    if gamma is not None:
        rows = rows * gamma.detach().float().to(rows.device)
    top = (rows @ unembed.T).topk(n, dim=-1).indices.tolist()
    return [[tokenizer.decode([i]) for i in ids] for ids in top]


def _batches(tokenizer: Any, texts: list[str], max_length: int, batch_size: int) -> list[tuple[list[list[int]], dict]]:
    seqs = [encode(tokenizer, t)[:max_length] for t in texts]
    seqs = [s for s in seqs if s]
    return [
        (seqs[i : i + batch_size], left_padded_batch(tokenizer, seqs[i : i + batch_size]))
        for i in range(0, len(seqs), batch_size)
    ]


class _Tracker:
    """Running top-n activations per latent, per-token maxima and firing counts over a text sample."""

    def __init__(self, k: int, vocab: int, n: int) -> None:
        self.n = n
        self.values = torch.zeros(k, 0)
        self.places = torch.zeros(k, 0, 2, dtype=torch.long)  # (sequence, position in its padded batch)
        self.token_max = torch.zeros(k, vocab)
        self.fired = torch.zeros(k)
        self.n_tokens = 0
        self.seqs: list[tuple[int, list[int]]] = []  # (left padding, token ids) per sequence

    def update(self, acts: torch.Tensor, batch: dict, seqs: list[list[int]]) -> None:
        """Fold in latent activations ``[b, pos, k]`` of one left-padded batch."""
        real = sae_positions(batch["attention_mask"])
        acts = acts.masked_fill(~real[..., None], -1.0)
        self.fired += (acts > 0).sum((0, 1)).float()
        self.n_tokens += int(real.sum())
        ids = batch["input_ids"]
        flat = acts.flatten(0, 1).T  # [k, b*pos]
        self.token_max = self.token_max.scatter_reduce(
            1, ids.flatten()[None].expand_as(flat), flat.clamp_min(0), "amax"
        )
        grid = torch.meshgrid(torch.arange(ids.shape[0]), torch.arange(ids.shape[1]), indexing="ij")
        where = torch.stack(grid, -1).flatten(0, 1) + torch.tensor([len(self.seqs), 0])
        values = torch.cat([self.values, flat], 1)
        places = torch.cat([self.places, where[None].expand(flat.shape[0], -1, -1)], 1)
        keep = values.topk(min(self.n, values.shape[1]), dim=1).indices
        self.values, self.places = values.gather(1, keep), places.gather(1, keep[..., None].expand(-1, -1, 2))
        self.seqs += [(ids.shape[1] - len(s), s) for s in seqs]

    def explanation(self, row: int, latent: int, tokenizer: Any, window: int, promoted: list[str]) -> LatentExplanation:
        contexts = []
        for value, (seq, pos) in zip(self.values[row].tolist(), self.places[row].tolist(), strict=True):
            offset, ids = self.seqs[seq]
            p = pos - offset
            if value > 0 and p >= 0:
                contexts.append((tokenizer.decode(ids[max(0, p - window) : p]), tokenizer.decode([ids[p]]), value))
        top = self.token_max[row].topk(min(self.n, self.token_max.shape[1]))
        tokens = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices, strict=True) if v > 0]
        maximum = max(float(self.values[row].max()), 0.0) if self.values.shape[1] else 0.0
        frequency = float(self.fired[row]) / max(self.n_tokens, 1)
        return LatentExplanation(latent, maximum, frequency, tokens, contexts, promoted)


@torch.no_grad()
def explain_latents(
    model: nn.Module,
    tokenizer: Any,
    site: SAESite,
    latents: Sequence[int] | LatentSet,
    texts: Sequence[str],
    *,
    n_examples: int = 5,
    window: int = 8,
    max_length: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> list[LatentExplanation]:
    """Top-activating tokens and contexts of ``latents`` over ``texts`` (each cut to ``max_length`` tokens).

    Each text's first token is left out (see :func:`~mi_peft.sae.site.sae_positions`): it is the attention sink.

    Example:
        >>> for e in explain_latents(model, tok, site, result.select(top_k=5, kinds=("sae",)), paragraphs):
        ...     print(e.render())
    """
    chosen = site.check_latents(latents)
    texts = check_texts(texts, "texts")
    for value, name in ((n_examples, "n_examples"), (max_length, "max_length"), (batch_size, "batch_size")):
        check_positive(value, name)
    idx = torch.tensor(chosen, device=site.sae.W_dec.device)
    tracker = _Tracker(len(chosen), spec_for(model).unembed_module(model).weight.shape[0], n_examples)
    for seqs, batch in tqdm(_batches(tokenizer, texts, max_length, batch_size), desc="explain", disable=not progress):
        tracker.update(latent_acts(model, site, batch)[..., idx].cpu(), batch, seqs)
    promoted = _promoted(model, site, chosen, tokenizer, 5)
    return [tracker.explanation(row, latent, tokenizer, window, promoted[row]) for row, latent in enumerate(chosen)]
