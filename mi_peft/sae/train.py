"""Train an SAE on a model's residual stream with sae-lens's own trainer, and measure how well it reconstructs.

sae-lens's ``LanguageModelSAETrainingRunner`` drives a TransformerLens ``HookedTransformer``, which cannot wrap
an arbitrary Hugging Face model (and cannot load the embedded model offline). Its :class:`sae_lens.SAETrainer`
only needs an iterator of activation batches, so mi-peft collects the residual stream with its own hooks
(the architecture map decides where) and hands sae-lens the rest: the BatchTopK SAE, its losses, the
activation-norm scaling, dead-latent auxiliary loss, and the conversion to an inference (JumpReLU) SAE.

Trained SAEs are cached under ``$MI_PEFT_CACHE/sae`` keyed by model fingerprint, layer, settings and data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import capture
from .._io import write_folder_atomically
from ..arch import spec_for
from ..data import check_positive, check_texts, encode, left_padded_batch
from ..fingerprint import model_fingerprint
from ..models import cache_dir
from ._lens import require_sae_lens
from .site import FINGERPRINT_KEY, SAESite, attach, resid_hook_name, residual_at, sae_positions

STATS_FILE = "mi_peft_sae.json"


@dataclass
class SAEStats:
    """Reconstruction quality as SAE users read it (first token of each text left out, like training).

    Args:
        fvu: fraction of variance unexplained, ``sum |x - x_hat|^2 / sum |x - mean(x)|^2``.
        l0: mean number of active latents per token. dead_fraction: latents that never fired on the sample.
        ce_clean, ce_sae: next-token loss (nats) of the model, and with the SAE's reconstruction in place of
            the activation (no error term). ce_increase: ``ce_sae - ce_clean``.
    """

    fvu: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_sae: float
    ce_increase: float
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _chunks(tokenizer: Any, texts: Sequence[str], context: int) -> Iterator[list[int]]:
    for text in texts:
        ids = encode(tokenizer, text)
        for start in range(0, len(ids), context):
            if len(ids) - start > 1:
                yield ids[start : start + context]


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int,
    *,
    n_tokens: int,
    context: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Residual-stream vectors ``[n, d_model]`` (float32, CPU) after ``layer``, from ``texts`` cut into ``context``-token chunks.

    The first token of each chunk is left out: its activation (the attention sink) is far larger than the rest.
    Stops at ``n_tokens`` vectors; fewer when the texts run out.
    """
    spec_for(model).check_layer(layer)
    chunks, out, total = _chunks(tokenizer, check_texts(texts, "texts"), context), [], 0
    bar = tqdm(total=n_tokens, desc=f"activations L{layer}", disable=not progress, unit="tok")
    while total < n_tokens:
        seqs = [s for _, s in zip(range(batch_size), chunks, strict=False)]
        if not seqs:
            break
        batch = left_padded_batch(tokenizer, seqs)
        acts = residual_at(model, layer, batch).float().cpu()[sae_positions(batch["attention_mask"])]
        out.append(acts[: n_tokens - total])
        total += out[-1].shape[0]
        bar.update(out[-1].shape[0])
    bar.close()
    if total == 0:
        raise ValueError("`texts` gave no activations (every text is shorter than two tokens); pass a real corpus.")
    return torch.cat(out)


def _batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of ``acts`` (a new permutation each pass): sae-lens's DataProvider."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts.shape[0], generator=gen)
        for start in range(0, acts.shape[0] - batch + 1, batch):
            yield acts[order[start : start + batch]]


def _settings_key(model: nn.Module, texts: Sequence[str], settings: dict[str, Any]) -> tuple[str, str]:
    fingerprint = model_fingerprint(model)
    digest = hashlib.sha256(json.dumps([fingerprint, settings, list(texts)], sort_keys=True).encode()).hexdigest()
    name = f"{fingerprint.split('.')[0][:12]}-L{settings['layer']}-w{settings['d_sae']}-k{settings['k']}-{digest[:10]}"
    return fingerprint, name


def _fit(acts: torch.Tensor, settings: dict[str, Any], metadata: dict[str, Any], device: str) -> Any:
    """Train a sae-lens BatchTopK SAE on ``acts`` and return it as a sae-lens inference SAE."""
    lens = require_sae_lens()
    torch.manual_seed(settings["seed"])
    batch = min(settings["batch"], acts.shape[0])
    steps = max(1, acts.shape[0] * settings["epochs"] // batch)
    cfg = lens.BatchTopKTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=settings["d_sae"],
        k=settings["k"],
        normalize_activations="expected_average_only_in",
        # The saved JumpReLU threshold is a moving average that starts at 0; short runs need it to settle.
        topk_threshold_lr=min(0.2, max(0.01, 10 / steps)),
        device=device,
    )
    for key, value in metadata.items():
        cfg.metadata[key] = value
    trainer_cfg = lens.config.SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=settings["lr"],
        lr_end=settings["lr"],
        lr_decay_steps=steps // 5,
        dead_feature_window=max(10, min(1000, steps // 4)),
        feature_sampling_window=max(10, steps),
        n_batches_for_norm_estimate=min(20, steps),
        device=device,
        logger=lens.LoggingConfig(log_to_wandb=False),
    )
    sae = lens.BatchTopKTrainingSAE(cfg)
    lens.SAETrainer(trainer_cfg, sae, _batches(acts, batch, settings["seed"])).fit()
    # What `save_inference_model` writes, built in memory: BatchTopK becomes JumpReLU, decoder norms folded.
    state = {name: value.detach().clone() for name, value in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    inference = lens.SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference.to(device).eval()


def train_sae(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    layer: int,
    d_sae: int = 4096,
    k: int = 32,
    tokens: int = 200_000,
    epochs: int = 2,
    batch: int = 1024,
    lr: float = 1e-3,
    context: int = 128,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
) -> SAESite:
    """Train a BatchTopK SAE (``d_sae`` latents, ``k`` active on average) on layer ``layer``'s output.

    Collects ``tokens`` activations from ``texts`` and trains ``epochs`` passes over them with sae-lens's
    ``SAETrainer``; the result is a sae-lens JumpReLU SAE (how BatchTopK SAEs are saved) attached to ``model``.
    With ``cache``, an SAE of the same model, settings and texts is loaded from ``$MI_PEFT_CACHE/sae``
    (``site.path`` names the folder, a normal sae-lens folder that :func:`~mi_peft.sae.load_sae` reads).

    Example:
        >>> site = train_sae(model, tok, paragraphs, layer=15, d_sae=4096, k=32, tokens=200_000)
        >>> site.sae.save_model("runs/sae-l15")  # a normal sae-lens folder
    """
    texts = check_texts(texts, "texts")
    for value, name in ((d_sae, "d_sae"), (k, "k"), (tokens, "tokens"), (epochs, "epochs"), (batch, "batch")):
        check_positive(value, name)
    if k >= d_sae:
        raise ValueError(f"`k` ({k}) must be smaller than `d_sae` ({d_sae}): k is the number of active latents.")
    spec_for(model).check_layer(layer)
    settings = dict(layer=layer, d_sae=d_sae, k=k, tokens=tokens, epochs=epochs, batch=batch, lr=lr)
    settings.update(context=context, seed=seed)
    fingerprint, name = _settings_key(model, texts, settings)
    folder = cache_dir() / "sae" / name
    if cache and (folder / "cfg.json").is_file():
        site = attach(require_sae_lens().SAE.load_from_disk(str(folder)), model)
        site.path = folder
        return site
    acts = collect_activations(model, tokenizer, texts, layer, n_tokens=tokens, context=context, progress=progress)
    metadata = {
        "hook_name": resid_hook_name(layer),
        "model_name": getattr(getattr(model, "config", None), "name_or_path", None) or "",
        "context_size": context,
        FINGERPRINT_KEY: fingerprint,
    }
    device = str(next(model.parameters()).device)
    sae = _fit(acts, settings, metadata, device)
    if cache:

        def write(tmp: Path) -> None:
            sae.save_model(tmp)
            (tmp / STATS_FILE).write_text(json.dumps({"settings": settings, "n_activations": len(acts)}, indent=2))

        write_folder_atomically(folder, write)
    site = attach(sae, model)
    site.path = folder if cache else None
    return site


def _loss(logits: torch.Tensor, batch: dict) -> tuple[float, int]:
    """Summed next-token loss over real tokens and how many there were."""
    target, mask = batch["input_ids"][:, 1:].to(logits.device), batch["attention_mask"][:, 1:].to(logits.device)
    mask = mask * batch["attention_mask"][:, :-1].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), reduction="none")
    return float((nll * mask.flatten()).sum()), int(mask.sum())


def _forward(model: nn.Module, site: SAESite, batch: dict, keep: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``batch``; with ``keep``, the SAE reconstruction replaces the activation at those positions."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    if keep is None:
        return model(**inputs).logits

    def splice(x: torch.Tensor) -> torch.Tensor:
        recon = site.sae.decode(site.sae.encode(x.to(site.sae.W_dec.dtype))).to(x.dtype)
        return torch.where(keep.to(x.device)[..., None], recon, x)

    with capture.edit(model, residual={site.layer: splice}):
        return model(**inputs).logits


@torch.no_grad()
def reconstruction_stats(
    model: nn.Module, tokenizer: Any, site: SAESite, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 8
) -> SAEStats:
    """FVU, L0, dead latents and next-token loss increase of ``site``'s SAE on ``texts`` (cut to ``max_length``)."""
    seqs = [s for s in (encode(tokenizer, t)[:max_length] for t in check_texts(texts, "texts")) if len(s) > 2]
    if not seqs:
        raise ValueError("`texts` gave no tokens to measure; pass texts of at least three tokens.")
    err, sq, active, n = 0.0, 0.0, 0.0, 0
    total = torch.zeros(site.d_in, dtype=torch.float64)
    fired = torch.zeros(site.d_sae, dtype=torch.bool)
    ce = torch.zeros(3, dtype=torch.float64)  # clean loss, spliced loss, counted tokens
    for start in range(0, len(seqs), batch_size):
        batch = left_padded_batch(tokenizer, seqs[start : start + batch_size])
        keep = sae_positions(batch["attention_mask"])
        x = residual_at(model, site.layer, batch).float().cpu()[keep].double()
        f = site.encode(x.float()).cpu()
        recon = site.sae.decode(f.to(site.sae.W_dec)).double().cpu()
        err += float(((x - recon) ** 2).sum())
        sq, total, n = sq + float((x**2).sum()), total + x.sum(0), n + x.shape[0]
        active += float((f > 0).sum())
        fired |= (f > 0).any(0)
        clean, count = _loss(_forward(model, site, batch, None), batch)
        spliced, _ = _loss(_forward(model, site, batch, keep), batch)
        ce += torch.tensor([clean, spliced, count], dtype=torch.float64)
    variance = sq - float((total**2).sum()) / n
    ce_clean, ce_sae = float(ce[0] / ce[2]), float(ce[1] / ce[2])
    return SAEStats(
        fvu=err / variance,
        l0=active / n,
        dead_fraction=float((~fired).float().mean()),
        ce_clean=ce_clean,
        ce_sae=ce_sae,
        ce_increase=ce_sae - ce_clean,
        n_tokens=n,
    )
