"""The recipe field ``locate.cost``: rank located components by gain per unit of cost on generic text.

    locate:
      cost: {texts: data/general/wikitext2_valid.txt, n_texts: 64, penalty: 1.0, max_length: 128}

``texts`` (relative to the recipe) is a ``.txt`` file of paragraphs (one per line; WikiText headings are
skipped) or a JSON/JSONL list of strings; the first ``n_texts`` are scored by
:func:`mi_peft.locate.slice_fisher` and the located scores are divided by the relative cost
(:func:`mi_peft.locate.per_cost`). Parsed once here for recipe validation and for the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIELDS = ("texts", "n_texts", "penalty", "max_length")


@dataclass(frozen=True)
class CostOption:
    texts: Path
    n_texts: int = 64
    penalty: float = 1.0
    max_length: int = 128

    @classmethod
    def from_raw(cls, raw: Any, base: Path, where: str) -> CostOption:
        """Check ``raw`` (the YAML mapping) and resolve ``texts`` against ``base``; errors name the field and fix."""
        example = "{texts: data/general/wikitext2_valid.txt, n_texts: 64, penalty: 1.0}"
        if not isinstance(raw, dict) or "texts" not in raw or set(raw) - set(FIELDS):
            raise ValueError(
                f"{where}: `locate.cost` is a mapping with `texts` and optional {FIELDS[1:]}, e.g. {example}."
            )
        texts = (base / str(raw["texts"])).resolve()
        if not texts.is_file():
            raise FileNotFoundError(f"{where}: `locate.cost.texts` points to {texts}, which is not a file.")
        from .data import check_positive
        from .locate.cost import check_penalty

        option = cls(texts, **{k: raw[k] for k in FIELDS[1:] if k in raw})
        try:
            for name in ("n_texts", "max_length"):
                check_positive(getattr(option, name), f"locate.cost.{name}")
            check_penalty(option.penalty, "locate.cost.penalty")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        return option

    def load_texts(self) -> list[str]:
        """The first ``n_texts`` texts; fewer in the file is an error naming both counts."""
        from .data_files import read_texts
        from .evaluate.general import load_paragraphs

        texts = load_paragraphs(self.texts) if self.texts.suffix == ".txt" else read_texts(self.texts)
        if len(texts) < self.n_texts:
            raise ValueError(
                f"`locate.cost.n_texts` is {self.n_texts} but {self.texts.name} holds {len(texts)} texts; lower it."
            )
        return texts[: self.n_texts]
