"""Attach a sae-lens SAE to a model's residual stream, located through the architecture map.

sae-lens names an SAE's hook point the TransformerLens way (``cfg.metadata.hook_name``, e.g.
``blocks.6.hook_resid_post``). mi-peft reads only the layer number and the hook kind from that name and
finds the module through :func:`mi_peft.arch.spec_for`, exactly where :func:`mi_peft.capture.record`
captures ``residual`` for that layer, so the SAE reads the same tensor the rest of mi-peft sees.

Supported hook points: ``blocks.L.hook_resid_post`` (output of decoder layer ``L``) and
``blocks.L.hook_resid_pre`` for ``L >= 1`` (the same tensor as the output of layer ``L - 1``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import capture
from ..arch import ArchSpec, spec_for
from ..fingerprint import check_fingerprint
from ..locate.sae_kind import LatentSet
from ._lens import is_sae, require_sae_lens

LatentEdit = Callable[[torch.Tensor], torch.Tensor]
FINGERPRINT_KEY = "mi_peft_model_fingerprint"  # written into the SAE's metadata by mi_peft.sae.train_sae
_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre)$")
# Normalisations that keep encode/decode stateless, so an SAE can decode twice per forward (edited + clean).
_NORMALISATIONS = ("none", "expected_average_only_in")


def resid_hook_name(layer: int) -> str:
    """The sae-lens / TransformerLens name of decoder layer ``layer``'s output."""
    return f"blocks.{layer}.hook_resid_post"


def hook_layer(hook_name: str, spec: ArchSpec) -> int:
    """Decoder layer whose output is the residual stream at ``hook_name`` (checked against the model)."""
    match = _HOOK.match(hook_name or "")
    if match is None:
        raise ValueError(
            f"SAE hook {hook_name!r} is not a residual-stream hook point; mi-peft attaches SAEs at "
            "'blocks.L.hook_resid_post' (or 'blocks.L.hook_resid_pre', L >= 1). Use an SAE trained on the "
            "residual stream, or train one with `mi_peft.sae.train_sae(model, tokenizer, texts, layer=L)`."
        )
    layer = int(match.group(1)) - (1 if match.group(2) == "hook_resid_pre" else 0)
    if layer < 0:
        raise ValueError(
            f"SAE hook {hook_name!r} reads the embeddings (resid_pre of layer 0); mi-peft attaches SAEs to decoder "
            "layer outputs. Use an SAE of a later layer."
        )
    if not 0 <= layer < spec.n_layers:
        raise ValueError(
            f"SAE hook {hook_name!r} is at layer {layer}, but this {spec.model_type} model has layers "
            f"0..{spec.n_layers - 1}: the SAE was trained on another model. Load an SAE of this model or train one."
        )
    return layer


@dataclass(eq=False)
class SAESite:
    """A sae-lens SAE together with the decoder layer whose output it reads.

    Build it with :func:`load_sae` (checks width, hook, weights and fingerprint against the model) or
    :func:`mi_peft.sae.train_sae`.
    """

    sae: Any
    layer: int
    hook_name: str
    path: Path | None = None  # the folder it was loaded from or cached in (None: only in memory)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    def check_latents(self, latents: Any) -> list[int]:
        """``latents`` as a non-empty list of ints in ``0..d_sae-1`` (an error names the valid range).

        A :class:`~mi_peft.locate.LatentSet` (from ``result.select(kinds=("sae",))``) gives its latents at this layer.
        """
        if isinstance(latents, LatentSet):
            if self.layer not in latents.latents:
                raise ValueError(
                    f"this LatentSet has no latents at layer {self.layer} (the SAE's layer); it has layers "
                    f"{latents.layers}. Select from a result scored with this SAE."
                )
            latents = latents.at(self.layer)
        values = [latents] if isinstance(latents, int) else list(latents)
        if not values:
            raise ValueError("no latents given; pass at least one latent index (e.g. from `result.top('sae', 5)`).")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.d_sae:
                raise ValueError(
                    f"latent index {value!r} is out of range: this SAE has latents 0..{self.d_sae - 1} "
                    f"(d_sae={self.d_sae})."
                )
        if len(set(values)) != len(values):
            raise ValueError(f"latent indices repeat in {values}; pass each latent once.")
        return values

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of residual-stream vectors ``[..., d_in]`` (float32)."""
        return self.sae.encode(x.to(self.sae.W_dec.device, self.sae.W_dec.dtype)).float()

    def __repr__(self) -> str:
        arch = self.sae.cfg.architecture()
        return f"SAESite({arch} SAE, d_in={self.d_in}, d_sae={self.d_sae}, layer={self.layer}, hook={self.hook_name!r})"


def check_sae(sae: Any, spec: ArchSpec) -> None:
    """Refuse an SAE that cannot read this model's residual stream: width, NaN weights, stateful normalisation."""
    cfg = sae.cfg
    if int(cfg.d_in) != spec.d_model:
        raise ValueError(
            f"SAE width does not match the model: the SAE reads d_in={cfg.d_in} activations but this "
            f"{spec.model_type} model's residual stream has d_model={spec.d_model}. Use an SAE trained on this "
            "model, or train one with `mi_peft.sae.train_sae`."
        )
    if cfg.reshape_activations != "none" or cfg.normalize_activations not in _NORMALISATIONS:
        raise ValueError(
            f"SAE normalises or reshapes its input at run time (normalize_activations={cfg.normalize_activations!r}, "
            f"reshape_activations={cfg.reshape_activations!r}); mi-peft supports residual-stream SAEs with "
            f"normalize_activations in {_NORMALISATIONS}. Fold the normalisation into the weights first."
        )
    for name, param in sae.state_dict().items():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ValueError(
                f"SAE weights contain NaN or infinite values in {name!r}: the file is damaged or training "
                "diverged. Retrain the SAE (lower the learning rate) or load an intact copy."
            )


def attach(
    sae: Any, model: nn.Module, *, layer: int | None = None, ignore_fingerprint: bool = False, device: Any = None
) -> SAESite:
    """Check a loaded sae-lens ``SAE`` against ``model`` and return its :class:`SAESite`.

    ``layer`` is needed when the SAE's metadata names no hook point; when both exist they must agree.
    """
    if not is_sae(sae):
        raise TypeError(f"expected a sae_lens.SAE, got {type(sae).__name__}; load one with `mi_peft.sae.load_sae`.")
    spec = spec_for(model)
    hook = sae.cfg.metadata.hook_name
    if hook is None:
        if layer is None:
            raise ValueError("this SAE's metadata names no hook point; pass `layer=L` (the decoder layer it reads).")
        spec.check_layer(layer)
        chosen = layer
    else:
        chosen = hook_layer(hook, spec)
        if layer is not None and layer != chosen:
            raise ValueError(
                f"SAE hook {hook!r} reads the output of layer {chosen}, but layer={layer} was passed; "
                f"drop `layer=` or pass layer={chosen}."
            )
    check_sae(sae, spec)
    check_fingerprint(sae.cfg.metadata.get(FINGERPRINT_KEY), model, "This SAE", ignore_fingerprint)
    target = device if device is not None else next(model.parameters()).device
    if sae.W_dec.device != torch.device(target):
        sae = sae.to(target)
    sae.eval()
    return SAESite(sae=sae, layer=chosen, hook_name=hook or resid_hook_name(chosen))


def load_sae(
    source: str | os.PathLike | Any,
    model: nn.Module,
    *,
    layer: int | None = None,
    ignore_fingerprint: bool = False,
    device: Any = None,
) -> SAESite:
    """Load an SAE from a folder saved by sae-lens (``cfg.json`` + ``sae_weights.safetensors``) or take an SAE.

    Example:
        >>> site = load_sae("runs/sae/layer15", model)  # sae.save_model(...) output
        >>> site = load_sae(my_sae, model, layer=15)    # an in-memory sae_lens.SAE without a hook name
    """
    lens = require_sae_lens()
    folder = None
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source).expanduser()
        if not (folder / "cfg.json").is_file():
            raise FileNotFoundError(
                f"{folder} holds no sae-lens SAE (cfg.json missing); pass a folder written by `sae.save_model(...)`."
            )
        source = lens.SAE.load_from_disk(str(folder), device="cpu")
    site = attach(source, model, layer=layer, ignore_fingerprint=ignore_fingerprint, device=device)
    site.path = folder
    return site


def load_pretrained_sae(release: str, sae_id: str, model: nn.Module, **kwargs: Any) -> SAESite:
    """An SAE from sae-lens's pretrained registry (needs the network), checked against ``model``."""
    sae = require_sae_lens().SAE.from_pretrained(release, sae_id, device="cpu")
    return attach(sae, model, **kwargs)


def sae_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real tokens an SAE is trained and read on: all but each row's first (kept when it is the only one).

    The first token is the attention sink; its residual stream is orders of magnitude larger than the
    rest, so SAEs leave it out of training (as :func:`mi_peft.sae.train_sae` does) and reconstruct it badly.
    """
    mask = attention_mask.bool()
    return mask & ((attention_mask.long().cumsum(1) > 1) | (mask.sum(1, keepdim=True) == 1))


class _Stop(Exception):
    """Raised by a hook after the wanted layer so the rest of the forward pass is skipped."""


@torch.no_grad()
def residuals_at(model: nn.Module, layers: Sequence[int], batch: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Residual stream ``[batch, pos, d_model]`` after each of ``layers``, in ONE forward that stops after the last.

    Reading SAE latents needs nothing above the deepest SAE, so the later layers and the unembedding never run.
    """
    seen: dict[int, torch.Tensor] = {}
    last = max(layers)

    def grab(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(x: torch.Tensor) -> torch.Tensor:
            seen[layer] = x.detach()
            if layer == last:
                raise _Stop
            return x

        return hook

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with capture.edit(model, residual={layer: grab(layer) for layer in set(layers)}), suppress(_Stop):
        model(**inputs)
    if last not in seen:
        raise RuntimeError(f"layer {last} did not run; is `batch` empty?")
    return seen


def residual_at(model: nn.Module, layer: int, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Residual stream ``[batch, pos, d_model]`` after decoder layer ``layer``; later layers do not run."""
    return residuals_at(model, [layer], batch)[layer]


def latent_acts(model: nn.Module, site: SAESite, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """SAE latent activations ``[batch, pos, d_sae]`` (float32) of a tokenized batch."""
    return site.encode(residual_at(model, site.layer, batch))


@contextmanager
def intervene(
    model: nn.Module, site: SAESite, edit: LatentEdit | None = None, *, error_term: bool = True
) -> Iterator[None]:
    """Run ``model`` with the SAE spliced into its residual stream, optionally editing latents.

    The layer output ``x`` becomes ``decode(edit(f)) + (x - decode(f))`` with ``f = encode(x)``: the error
    term keeps everything the SAE does not reconstruct, so with no edit the forward is unchanged. With
    ``error_term=False`` it becomes ``decode(edit(f))`` (how next-token loss under the SAE is measured).

    Args:
        edit: ``f -> f'`` on latents ``[batch, pos, d_sae]``; return a new tensor.
    """
    sae = site.sae

    def splice(x: torch.Tensor) -> torch.Tensor:
        h = x.to(sae.W_dec.dtype)
        f = sae.encode(h)
        new = f if edit is None else edit(f)
        if new.shape != f.shape:
            raise ValueError(f"`edit` must return latents of shape {tuple(f.shape)}, got {tuple(new.shape)}.")
        recon = sae.decode(f)
        out = recon if edit is None else sae.decode(new)
        if error_term:
            out = out + (h - recon)  # the error term: what the SAE does not reconstruct
        return out.to(x.dtype)

    with capture.edit(model, residual={site.layer: splice}):
        yield
