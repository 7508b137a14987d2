"""EvalReport: named scalar metrics plus metadata, checked finite and JSON-serialisable."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _metric(name: Any, value: Any) -> float:
    """``value`` as a finite float, or a ValueError naming the metric."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric names must be non-empty strings, got {name!r}.")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        item = getattr(value, "item", None)  # 0-d torch / numpy values
        if not callable(item) or getattr(value, "ndim", 0) != 0:
            raise ValueError(f"metric {name!r} must be a real number, got {type(value).__name__}: {value!r:.80}.")
        value = item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"metric {name!r} is {value}; a report only holds finite numbers.")
    return value


def _check_metadata(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise ValueError(f"`metadata` must be a dict, got {type(metadata).__name__}.")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`metadata` must be JSON-serialisable with finite numbers: {err}.") from err
    return metadata


@dataclass
class EvalReport:
    """Named metrics of one model (e.g. ``refusal``, ``over_refusal``, ``kl_to_base``) and what produced them.

    Example:
        >>> report = EvalReport(metadata={"model": "SmolLM2-135M-Instruct", "adapter": "out/refusal"})
        >>> report.add("refusal", refusal_rate(model, tok, harmful).rate)
        >>> report.add("kl_to_base", kl_to_base(model, tok, neutral))
        >>> report.save("eval.json")
    """

    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.metrics, dict):
            raise ValueError(f"`metrics` must be a dict of name -> number, got {type(self.metrics).__name__}.")
        self.metrics = {name: _metric(name, value) for name, value in self.metrics.items()}
        self.metadata = _check_metadata(self.metadata)

    def add(self, name: str, value: float) -> EvalReport:
        """Set metric ``name`` (replacing an earlier value); returns the report for chaining."""
        self.metrics[name] = _metric(name, value)
        return self

    def __getitem__(self, name: str) -> float:
        if name not in self.metrics:
            raise KeyError(f"no metric {name!r}; the report holds {sorted(self.metrics)}.")
        return self.metrics[name]

    def to_dict(self) -> dict[str, Any]:
        _check_metadata(self.metadata)
        return {"metrics": {k: _metric(k, v) for k, v in self.metrics.items()}, "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        if not isinstance(data, dict) or "metrics" not in data:
            raise ValueError("an EvalReport dict needs a 'metrics' key (as written by `to_dict`).")
        return cls(metrics=dict(data["metrics"]), metadata=dict(data.get("metadata", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_markdown(self, baseline: EvalReport | None = None) -> str:
        """A metric table; with ``baseline`` (e.g. the base model's report) adds its values and the change."""
        if baseline is None:
            rows = ["| metric | value |", "|---|---|"]
            rows += [f"| {k} | {v:.4g} |" for k, v in self.metrics.items()]
            return "\n".join(rows)
        rows = ["| metric | baseline | value | change |", "|---|---|---|---|"]
        for k, v in self.metrics.items():
            b = baseline.metrics.get(k)
            rows.append(
                f"| {k} | {'' if b is None else f'{b:.4g}'} | {v:.4g} | {'' if b is None else f'{v - b:+.4g}'} |"
            )
        return "\n".join(rows)
