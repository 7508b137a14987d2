"""Logit lens: what each layer's residual stream would predict if it were the last layer.

Every layer's residual stream (``hook_resid_post``) at the last prompt token is passed through the
final norm and the unembedding. Models that post-process logits (Gemma-2/3 final logit
softcapping, ``tanh(x / c) * c``) are not post-processed here: their lens probabilities differ
from the model's, while the token order (top-k, ranks) is the same since tanh is monotone.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import capture
from .arch import spec_for
from .data import format_prompts, tokenize


@dataclass(eq=False)
class LensResult:
    """Per prompt and layer: top-k tokens and the probability and rank of each target.

    Shapes: ``top_ids``/``top_probs`` ``[n_prompts, n_layers, k]``; ``target_probs``/``target_ranks``
    ``[n_prompts, n_layers, n_targets]``. A rank is the number of tokens with a higher logit
    (0 = the layer's top prediction). A target is scored by the first token of its encoding.
    """

    prompts: list[str]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_tokens: list[list[list[str]]]
    targets: list[str]
    target_ids: list[int]
    target_probs: torch.Tensor
    target_ranks: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[1]

    def __repr__(self) -> str:
        return f"LensResult(prompts={len(self.prompts)}, layers={self.n_layers}, k={self.top_ids.shape[2]}, targets={self.targets})"

    def table(self) -> list[dict[str, Any]]:
        """One row per (prompt, layer): ``prompt`` (index), ``layer``, ``top_tokens``, ``top_probs``,
        and per target ``t`` the columns ``p[t]`` and ``rank[t]``."""
        rows = []
        probs, ranks, top_probs = self.target_probs.tolist(), self.target_ranks.tolist(), self.top_probs.tolist()
        for p in range(len(self.prompts)):
            for layer in range(self.n_layers):
                row: dict[str, Any] = {
                    "prompt": p,
                    "layer": layer,
                    "top_tokens": self.top_tokens[p][layer],
                    "top_probs": top_probs[p][layer],
                }
                for t, target in enumerate(self.targets):
                    row[f"p[{target}]"] = probs[p][layer][t]
                    row[f"rank[{target}]"] = ranks[p][layer][t]
                rows.append(row)
        return rows

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG of target probability by layer (one line per prompt and target for up to 4 prompts,
        else the mean with a min-max band); without targets, top-1 probability annotated with the token."""
        from matplotlib.figure import Figure

        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"`plot` writes a PNG; pass a path ending in .png, got {str(path)!r}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        layers = range(self.n_layers)
        if self.targets and len(self.prompts) <= 4:
            for (p, prompt), (t, target) in itertools.product(enumerate(self.prompts), enumerate(self.targets)):
                label = f"p({target!r})" + (f" | {prompt[:30]!r}" if len(self.prompts) > 1 else "")
                ax.plot(layers, self.target_probs[p, :, t].numpy(), marker="o", label=label)
        elif self.targets:
            for t, target in enumerate(self.targets):
                values = self.target_probs[:, :, t]
                ax.plot(layers, values.mean(0).numpy(), marker="o", label=f"mean p({target!r}) over prompts")
                ax.fill_between(layers, values.min(0).values.numpy(), values.max(0).values.numpy(), alpha=0.2)
        else:
            for p, prompt in enumerate(self.prompts):
                ax.plot(layers, self.top_probs[p, :, 0].numpy(), marker="o", label=prompt[:40])
            for layer in layers:
                ax.annotate(repr(self.top_tokens[0][layer][0]), (layer, float(self.top_probs[0, layer, 0])), fontsize=7)
        ylabel = "target probability" if self.targets else "top-1 probability"
        ax.set(xlabel="layer", ylabel=ylabel, ylim=(0, 1.02), title="logit lens")
        ax.legend(fontsize=8)
        fig.savefig(path, dpi=110)
        return path


def logit_lens(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    targets: str | Sequence[str] | None = None,
    k: int = 5,
    plot: str | os.PathLike | None = None,
    chat: bool | None = None,
) -> LensResult:
    """Decode every layer's last-token residual stream through the final norm and unembedding.

    Args:
        prompts: user prompts, chat-formatted when the tokenizer has a chat template unless ``chat=False``.
        targets: strings whose first token's probability and rank are tracked across layers.
        k: top tokens kept per layer. plot: optional PNG path for :meth:`LensResult.plot`.

    Example:
        >>> lens = logit_lens(model, tokenizer, "The capital of France is", targets=[" Paris"], chat=False)
        >>> lens.target_ranks[0, -1, 0]  # 0: " Paris" is the final layer's top token
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty; pass at least one prompt.")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    target_ids = []
    for target in targets:
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"target {target!r} encodes to no tokens; pass a non-empty string.")
        target_ids.append(int(ids[0]))
    spec = spec_for(model)
    device = next(model.parameters()).device
    batch = {key: v.to(device) for key, v in tokenize(tokenizer, format_prompts(tokenizer, prompts, chat=chat)).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with capture.record(
                model, residual=True, positions="last", attention_mask=batch["attention_mask"]
            ) as cache:
                model(**batch)
            norm, unembed = spec.final_norm_module(model), spec.unembed_module(model)
            logits = unembed(norm(cache.stack("residual"))).float()  # [n_prompts, n_layers, vocab]
    finally:
        model.train(was_training)
    if k > logits.shape[-1]:
        raise ValueError(f"`k`={k} exceeds the vocabulary size {logits.shape[-1]}.")
    probs = logits.softmax(-1)
    top = probs.topk(k, dim=-1)
    tids = torch.tensor(target_ids, dtype=torch.long, device=logits.device)
    target_logits = logits.index_select(-1, tids)  # [n_prompts, n_layers, n_targets]
    ranks = (logits[..., None, :] > target_logits[..., None]).sum(-1)
    words = tokenizer.batch_decode(top.indices.reshape(-1, 1).tolist())
    n_layers = logits.shape[1]
    top_tokens = [
        [words[(p * n_layers + layer) * k : (p * n_layers + layer + 1) * k] for layer in range(n_layers)]
        for p in range(len(prompts))
    ]
    result = LensResult(
        prompts=prompts,
        top_ids=top.indices.cpu(),
        top_probs=top.values.cpu(),
        top_tokens=top_tokens,
        targets=targets,
        target_ids=target_ids,
        target_probs=probs.index_select(-1, tids).cpu(),
        target_ranks=ranks.cpu(),
    )
    if plot is not None:
        result.plot(plot)
    return result
