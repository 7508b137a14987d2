"""Score SAE latents for a behaviour: the ``"sae"`` kind of :func:`mi_peft.locate.locate`.

One implementation, three methods, every latent of every SAE at once (``[batch, k, d_sae]`` tensors, no
loop over latents):

- :func:`mean_diff`: mean latent activation on positive prompts minus on negative ones. Signed, unlike
  the component methods' norms: > 0 means the latent fires more when the behaviour is present.
- :func:`activation_stats`: Fisher ratio ``(mu_pos - mu_neg)^2 / pooled variance`` (``stat="abs_diff"``:
  the mean ``|activation|`` difference), as for components.
- :func:`attribution_patching`: ``(f_pos - f_neg) . d metric / d f`` at the negative run, the first-order
  estimate of patching each latent from the positive into the negative run (Marks et al. 2024). The SAE
  is spliced into the residual stream WITH its error term ``x - decode(f)``, so the model's forward is
  unchanged to the last bit and the gradient reaches each latent through its decoder row. The positive
  run stops after the deepest SAE; one forward+backward per negative batch scores ALL latents.

Latents are read at real tokens other than each prompt's first (the attention sink, which SAEs reconstruct
badly; :func:`~mi_peft.sae.site.sae_positions`). Per-latent means and firing frequencies go to
``result.extra["sae"]`` (read them with :func:`mi_peft.locate.latent_stats`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import capture
from ..arch import ArchSpec, spec_for
from ..data import ContrastivePairs
from ..locate.gradient import LogitsPlan
from ..locate.magnitude import (
    Batch,
    MethodOutput,
    PairBatches,
    Positions,
    _bar,
    _Moments,
    eval_mode,
    model_device,
    position_index,
    run_model,
    to_device,
)
from ..locate.result import LocalizationResult
from ..metrics import Metric
from ._lens import is_sae, require_sae_lens
from .site import SAESite, attach, residuals_at, sae_positions

SIDES = ("positive", "negative")


def resolve_sites(model: nn.Module, sae: Any) -> list[SAESite]:
    """``locate``'s ``sae=``: an :class:`SAESite`, a sae-lens SAE, or a list of them (one per layer), checked.

    Width, hook point and layer are checked against ``model`` again (an SAE of another model fails here,
    before any work); a raw SAE's fingerprint too. An ``SAESite`` keeps the fingerprint decision made
    when it was attached (``load_sae(..., ignore_fingerprint=True)``).
    """
    require_sae_lens()
    items = [sae] if isinstance(sae, SAESite) or is_sae(sae) else sae
    if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, Sequence) or not items:
        raise ValueError(
            f"`sae` must be an SAESite (from mi_peft.sae.load_sae or train_sae), a sae-lens SAE, or a list of "
            f"them, one per layer; got {type(sae).__name__}. Load a folder with `mi_peft.sae.load_sae(folder, model)`."
        )
    sites = []
    for item in items:
        if isinstance(item, SAESite):
            site = attach(item.sae, model, layer=item.layer, ignore_fingerprint=True)
            site.path = item.path
        elif is_sae(item):
            if item.cfg.metadata.hook_name is None:
                raise ValueError(
                    "this SAE's metadata names no hook point; attach it first: `load_sae(sae, model, layer=L)`."
                )
            site = attach(item, model)
        else:
            raise ValueError(f"`sae` items must be SAESite or sae-lens SAE objects, got {type(item).__name__}.")
        sites.append(site)
    layers = [site.layer for site in sites]
    if len(set(layers)) != len(layers):
        raise ValueError(f"several SAEs read the same layer (layers {layers}); pass one SAE per layer.")
    return sorted(sites, key=lambda site: site.layer)


def _where(positions: Positions, mask: Tensor) -> tuple[Tensor | None, Tensor]:
    """Token indices ``[B, k]`` (None for ``"mean"``) and their weights ``[B, k]``: 1 on real tokens but the first."""
    keep = sae_positions(mask).float()
    if positions == "mean":
        return None, torch.ones(mask.shape[0], 1, device=mask.device)
    idx = position_index(positions, mask)
    return idx, torch.gather(keep, 1, idx)


def _read(site: SAESite, resid: Tensor, where: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Latents and firing (0/1) ``[B, k, d_sae]`` at ``where``; per-prompt means over read tokens for ``"mean"``."""
    if where is None:
        keep = sae_positions(mask).float()
        weight = (keep / keep.sum(1, keepdim=True).clamp_min(1))[..., None].to(resid.device)
        f = site.encode(resid)
        return (f * weight).sum(1, keepdim=True), ((f > 0).float() * weight).sum(1, keepdim=True)
    rows = torch.arange(resid.shape[0], device=resid.device)[:, None]
    f = site.encode(resid[rows, where.to(resid.device)])
    return f, (f > 0).float()


class _SideStats:
    """Running weighted moments and firing counts of each SAE's latents, per side (0 positive, 1 negative)."""

    def __init__(self, sites: Sequence[SAESite]) -> None:
        self.moments = {(s.layer, side): _Moments() for s in sites for side in (0, 1)}
        self.fired = {(s.layer, side): torch.zeros(s.d_sae, dtype=torch.float64) for s in sites for side in (0, 1)}

    def add(self, layer: int, side: int, f: Tensor, fired: Tensor, weight: Tensor) -> None:
        w = weight.to(f.device)
        self.moments[layer, side].add(f[..., None], w)
        self.fired[layer, side] += (fired * w[..., None]).sum((0, 1)).double().cpu()

    def check(self, positions: Positions) -> _SideStats:
        """Refuse a selection of positions where no latent was read (a mean over nothing)."""
        empty = [SIDES[side] for (_, side), m in self.moments.items() if float(m.n) == 0]
        if empty:
            raise ValueError(
                f"positions={positions!r} select no token SAE latents are read at on the {empty[0]} side: "
                "each prompt's first token (the attention sink) is left out. Use 'last', 'all' or later indices."
            )
        return self

    def mean(self, layer: int, side: int) -> Tensor:
        return self.moments[layer, side].mean()[:, 0].cpu()

    def extra(self, sites: Sequence[SAESite]) -> dict[str, Any]:
        """``{"sae": {layer: hook, width, architecture, mean and firing frequency per side}}`` (JSON-able)."""
        out = {}
        for s in sites:
            entry: dict[str, Any] = {
                "hook_name": s.hook_name,
                "d_sae": s.d_sae,
                "architecture": s.sae.cfg.architecture(),
            }
            for side, name in enumerate(SIDES):
                n = float(self.moments[s.layer, side].n)
                entry[f"mean_{name}"] = self.mean(s.layer, side).float().tolist()
                entry[f"freq_{name}"] = (self.fired[s.layer, side] / max(n, 1.0)).float().tolist()
            out[str(s.layer)] = entry
        return {"sae": out}


def _stack(spec: ArchSpec, sites: Sequence[SAESite], per_site: dict[int, Tensor]) -> Tensor:
    """``[n_layers, widest d_sae]`` float32: each SAE's scores in its layer's row, NaN elsewhere."""
    out = torch.full((spec.n_layers, max(s.d_sae for s in sites)), float("nan"))
    for s in sites:
        out[s.layer, : s.d_sae] = per_site[s.layer].float().cpu()
    return out


def _collect(
    model: nn.Module, batches: PairBatches, sites: Sequence[SAESite], positions: Positions, progress: bool, desc: str
) -> _SideStats:
    """Latent statistics of both sides, one forward per batch that stops after the deepest SAE."""
    stats, device, layers = _SideStats(sites), model_device(model), [s.layer for s in sites]
    with eval_mode(model), _bar(len(batches), progress, desc) as bar:
        for pair in batches:
            for side, batch in enumerate(pair):
                batch = to_device(batch, device)
                where, weight = _where(positions, batch["attention_mask"])
                resid = residuals_at(model, layers, batch)
                for s in sites:
                    stats.add(s.layer, side, *_read(s, resid[s.layer], where, batch["attention_mask"]), weight)
            bar.update(1)
    return stats.check(positions)


def mean_diff(
    model: nn.Module,
    batches: PairBatches,
    *,
    sites: Sequence[SAESite],
    positions: Positions = "last",
    progress: bool = False,
) -> MethodOutput:
    """Score = mean latent activation on positive prompts minus on negative ones (signed)."""
    stats = _collect(model, batches, sites, positions, progress, "SAE mean_diff")
    diff = {s.layer: stats.mean(s.layer, 0) - stats.mean(s.layer, 1) for s in sites}
    return {"sae": _stack(spec_for(model), sites, diff)}, stats.extra(sites)


def activation_stats(
    model: nn.Module,
    batches: PairBatches,
    *,
    sites: Sequence[SAESite],
    positions: Positions = "last",
    stat: Literal["fisher", "abs_diff"] = "fisher",
    progress: bool = False,
) -> MethodOutput:
    """``"fisher"``: ``(mu_pos - mu_neg)^2 / pooled variance`` per latent; ``"abs_diff"``: mean ``|f|`` difference.

    The statistic not chosen goes to ``extra[<its name>][str(layer)]``.
    """
    if stat not in ("fisher", "abs_diff"):
        raise ValueError(f"`stat` must be 'fisher' or 'abs_diff', got {stat!r}.")
    stats = _collect(model, batches, sites, positions, progress, "SAE activation_stats")
    fisher, abs_diff = {}, {}
    for s in sites:
        p, q = stats.moments[s.layer, 0], stats.moments[s.layer, 1]
        n_p, n_q = torch.as_tensor(p.n), torch.as_tensor(q.n)
        pooled = ((n_p - 1).clamp_min(0) * p.var() + (n_q - 1).clamp_min(0) * q.var()) / (n_p + n_q - 2).clamp_min(1)
        fisher[s.layer] = (((p.mean() - q.mean()) ** 2) / pooled.clamp_min(1e-12))[:, 0].cpu()
        abs_diff[s.layer] = (p.abs / p.n - q.abs / q.n).cpu()
    chosen, other = (fisher, abs_diff) if stat == "fisher" else (abs_diff, fisher)
    extra = stats.extra(sites)
    extra.update(
        stat=stat,
        **{"abs_diff" if stat == "fisher" else "fisher": {str(k): v.float().tolist() for k, v in other.items()}},
    )
    return {"sae": _stack(spec_for(model), sites, chosen)}, extra


def _leaf_splice(site: SAESite, idx: Tensor, leaves: dict[int, Tensor]) -> Callable[[Tensor], Tensor]:
    """Residual edit at ``site.layer``: the output stays ``x`` exactly, and the latents at ``idx`` become leaves.

    ``x + (decode(f) - decode(f).detach())`` is ``x`` to the last bit (the bracket is exactly zero), and its
    gradient w.r.t. ``f`` is the decoder's: the SAE spliced in with its error term ``x - decode(f)`` held fixed,
    while the gradient to ``x`` (and to any earlier SAE) passes unchanged.
    """
    sae = site.sae
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)

    def splice(x: Tensor) -> Tensor:
        h = x.to(sae.W_dec.dtype)
        with torch.no_grad():
            f = sae.encode(h[rows, idx])
        leaves[site.layer] = f.requires_grad_(True)
        recon = sae.decode(f)
        zero = torch.zeros_like(h).index_put((rows, idx), recon - recon.detach())
        return (h + zero).to(x.dtype)

    return splice


def _grad_pass(
    model: nn.Module, sites: Sequence[SAESite], batch: Batch, idx: Tensor, plan: LogitsPlan
) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
    """Forward+backward on ``batch`` with every SAE spliced in: latents, d metric / d latent, metric values."""
    leaves: dict[int, Tensor] = {}
    edits = {s.layer: _leaf_splice(s, idx, leaves) for s in sites}
    with torch.enable_grad(), capture.edit(model, residual=edits):
        out = run_model(model, batch, **plan.kwargs())
        plan.observe(out.logits, batch)
        value = plan.score(out.logits, batch)
        grads = torch.autograd.grad(value.sum(), [leaves[s.layer] for s in sites], allow_unused=True)
    f = {s.layer: leaves[s.layer].detach().float() for s in sites}
    g = {s.layer: (torch.zeros_like(f[s.layer]) if d is None else d.float()) for s, d in zip(sites, grads, strict=True)}
    return f, g, value.detach()


def attribution_patching(
    model: nn.Module,
    batches: PairBatches,
    *,
    sites: Sequence[SAESite],
    metric: Metric,
    positions: Positions = "last",
    progress: bool = False,
) -> MethodOutput:
    """Score = mean over pairs of ``sum_pos (f_pos - f_neg) * d metric / d f`` at the negative run.

    Estimates ``metric(negative with the latent patched to its positive value) - metric(negative)`` for
    every latent at once.
    """
    plan, device, layers = LogitsPlan(model, metric), model_device(model), [s.layer for s in sites]
    stats = _SideStats(sites)
    totals = {s.layer: torch.zeros(s.d_sae, dtype=torch.float64) for s in sites}
    n, neg_sum = 0, 0.0
    with eval_mode(model, freeze=True), _bar(len(batches), progress, "SAE attribution_patching") as bar:
        for pos, neg in batches:
            pos, neg = to_device(pos, device), to_device(neg, device)
            pos_idx, w_pos = _where(positions, pos["attention_mask"])
            neg_idx, w_neg = _where(positions, neg["attention_mask"])
            if pos_idx.shape != neg_idx.shape:
                raise ValueError(
                    f"positions={positions!r} select {pos_idx.shape[1]} positive vs {neg_idx.shape[1]} negative "
                    "tokens; patching needs the same number: use 'last' or negative indices such as [-2, -1]."
                )
            resid = residuals_at(model, layers, pos)
            f_neg, grads, value = _grad_pass(model, sites, neg, neg_idx, plan)
            for s in sites:
                f_pos = _read(s, resid[s.layer], pos_idx, pos["attention_mask"])[0]
                both = (w_pos * w_neg).to(f_pos.device)[..., None]
                totals[s.layer] += ((f_pos - f_neg[s.layer]) * grads[s.layer] * both).sum((0, 1)).double().cpu()
                stats.add(s.layer, 0, f_pos, (f_pos > 0).float(), w_pos)
                stats.add(s.layer, 1, f_neg[s.layer], (f_neg[s.layer] > 0).float(), w_neg)
            n += value.shape[0]
            neg_sum += float(value.sum())
            bar.update(1)
    stats.check(positions)
    scores = {s.layer: totals[s.layer] / n for s in sites}
    return {"sae": _stack(spec_for(model), sites, scores)}, {**stats.extra(sites), "metric_negative": neg_sum / n}


SAE_METHODS: dict[str, Callable[..., MethodOutput]] = {
    "mean_diff": mean_diff,
    "activation_stats": activation_stats,
    "attribution_patching": attribution_patching,
}


def locate_latents(
    model: nn.Module,
    tokenizer: Any,
    site: SAESite | Sequence[SAESite],
    pairs: ContrastivePairs,
    *,
    method: str = "mean_diff",
    positions: str | Sequence[int] = "last",
    batch_size: int = 8,
    chat: bool | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> LocalizationResult:
    """Shorthand for ``locate(model, tokenizer, pairs, method=method, sae=site, ...)``: scores ``[n_layers, d_sae]``.

    Example:
        >>> result = locate_latents(model, tok, site, ContrastivePairs.load("recipes/data/refusal").subset(64))
        >>> result.top("sae", 5, sign="positive")  # ((layer, latent), score): latents firing more on harmful prompts
    """
    from ..locate import locate

    return locate(
        model, tokenizer, pairs, method=method, components=("sae",), sae=site, positions=positions,
        batch_size=batch_size, chat=chat, progress=progress, **kwargs,
    )  # fmt: skip
