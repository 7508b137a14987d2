"""Per-forward token bookkeeping shared by every wrapped layer of one steering model.

Kept apart from the layer and model modules so both can import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol, Union

import torch
from torch import nn

Mask = Union[torch.Tensor, None, Literal[False]]
"""A layer's steering mask: a boolean ``[batch, seq, 1]`` tensor, ``None`` (every position) or ``False`` (none)."""


class StepPlan(Protocol):
    """The parts of a layer's plan that decide which positions it may change."""

    adapter: str
    layer: int
    positions: str
    condition: dict[str, Any] | None


class SteeringState:
    """Token bookkeeping for one forward pass: which positions are prompt or generated, and decisions.

    Updated by a forward pre-hook on the module that runs the decoder layers. A forward with an
    empty KV cache starts a new prompt (``prompt_len`` = its length); a forward with a filled cache
    continues it (its tokens are generated). Inside ``generate`` the prompt length is the input
    length, so generation without a KV cache (which re-runs the whole sequence) sees the same
    positions as with one. ``decisions`` holds, per adapter, which sequences a condition selected.

    Steering masks depend only on these fields, so each distinct mask is built once per forward and
    reused by every layer (the cache is emptied whenever a field or a decision changes).
    """

    def __init__(self) -> None:
        self.start = 0
        self.seq_len: int | None = None
        self.prompt_len: int | None = None
        self.attention_mask: torch.Tensor | None = None
        self.decisions: dict[str, torch.Tensor] = {}
        self.generate_prompt_len: int | None = None
        self._masks: dict[tuple, Mask] = {}
        self._rows: dict[str, tuple[torch.Tensor, bool, bool]] = {}  # adapter -> (rows, all selected, any selected)

    def on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        self.begin(x.shape[0], x.shape[1], start, kwargs.get("attention_mask"))

    def begin(self, batch: int, seq: int, start: int, attention_mask: Any = None) -> None:
        if self.generate_prompt_len is not None:
            prompt_len = self.generate_prompt_len
        elif start == 0:
            self.decisions = {}
            prompt_len = seq
        else:
            prompt_len = self.prompt_len if self.prompt_len is not None else start
        self.start, self.seq_len, self.prompt_len = start, seq, prompt_len
        mask = attention_mask
        ok = isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq
        self.attention_mask = mask[:, -seq:] if ok else None
        self._forget()

    def _forget(self) -> None:
        self._masks.clear()
        self._rows = {k: v for k, v in self._rows.items() if k in self.decisions}

    @contextmanager
    def generating(self, prompt_len: int) -> Iterator[None]:
        """Inside ``generate``: positions at or after ``prompt_len`` are generated tokens."""
        saved = self.generate_prompt_len
        self.generate_prompt_len, self.decisions = prompt_len, {}
        self._forget()
        try:
            yield
        finally:
            self.generate_prompt_len = saved
            self._forget()

    def decide(self, adapter: str, rows: torch.Tensor) -> None:
        """Record which sequences (boolean ``[batch]``) the condition of ``adapter`` selected."""
        self.decisions[adapter] = rows
        self._rows[adapter] = (rows, bool(rows.all()), bool(rows.any()))  # one sync per prompt, not per layer
        self._masks.clear()

    def generated(self, seq: int, device: torch.device) -> torch.Tensor:
        """Boolean ``[seq]``: which positions of the running forward are generated tokens."""
        if self.seq_len != seq or self.prompt_len is None:
            return torch.zeros(seq, dtype=torch.bool, device=device)
        return torch.arange(self.start, self.start + seq, device=device) >= self.prompt_len

    def _first_generated(self, seq: int) -> int:
        """Index of the first generated position of the running forward (``seq`` when there is none)."""
        if self.seq_len != seq or self.prompt_len is None:
            return seq
        return min(max(self.prompt_len - self.start, 0), seq)

    def steer_mask(self, plan: StepPlan, batch: int, seq: int, device: torch.device) -> Mask:
        """The positions ``plan`` may change: boolean ``[batch, seq, 1]``, ``None`` (all) or ``False`` (none).

        Built once per forward for each adapter (and side of its condition layer) and cached.
        """
        if plan.positions == "all" and plan.condition is None:
            return None
        after = None if plan.condition is None else plan.layer >= plan.condition["layer"]
        key = (plan.adapter, plan.positions, after, batch, seq, device)
        mask = self._masks.get(key, self)
        if mask is self:
            mask = self._masks[key] = self._build_mask(plan, after, batch, seq, device)
        return mask

    def _build_mask(self, plan: StepPlan, after: bool | None, batch: int, seq: int, device: torch.device) -> Mask:
        # Positions are an interval [lo, hi): the prompt is [0, g), the generated tokens [g, seq).
        g = self._first_generated(seq)
        lo, hi = {"all": (0, seq), "prompt": (0, g), "generated": (g, seq)}[plan.positions]
        rows_all = True
        if after is not None:
            if not after:  # before the condition layer the prompt is not decided yet
                lo = max(lo, g)
            rows = self.decisions.get(plan.adapter)
            if rows is None:
                return False
            if rows.shape[0] != batch:
                raise ValueError(
                    f"conditional steering decided for {rows.shape[0]} sequences but this forward has {batch}; "
                    "start a new prompt (empty KV cache) when the batch changes. Beam search is not supported."
                )
            known = self._rows.get(plan.adapter)
            if known is None or known[0] is not rows:
                known = self._rows[plan.adapter] = (rows, bool(rows.all()), bool(rows.any()))
            _, rows_all, rows_any = known
            if not rows_any:
                return False
        if lo >= hi:
            return False
        if rows_all and (lo, hi) == (0, seq):
            return None
        t = torch.arange(seq, device=device)
        mask = ((t >= lo) & (t < hi))[None, :].expand(batch, seq)
        if not rows_all:
            mask = mask & self.decisions[plan.adapter].to(device)[:, None]
        return mask[..., None]

    def prompt_tokens(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """Boolean ``[batch, seq]``: non-padding prompt tokens of the running forward (condition input)."""
        gen = self.generated(seq, device)
        keep = ~gen if not bool(gen.all()) else torch.ones_like(gen)
        mask = keep[None, :].expand(batch, seq)
        if self.attention_mask is not None and self.attention_mask.shape == (batch, seq):
            mask = mask & self.attention_mask.to(device).bool()
        return mask
