"""Behaviour and side-effect evaluation for any causal LM or PEFT-wrapped model.

Behaviour (from greedy generations): :func:`refusal_rate` (over-refusal = the same on harmless prompts),
:func:`target_rate`, :func:`language_rate`; from next-token probabilities: :func:`ab_accuracy` on CAA
A/B items. Side effects on neutral inputs: :func:`kl_to_base` (adapter on vs off, or vs a base model)
and :func:`perplexity`. :class:`EvalReport` collects the numbers.

Example:
    >>> from mi_peft.evaluate import EvalReport, kl_to_base, refusal_rate
    >>> report = EvalReport()
    >>> report.add("refusal", refusal_rate(peft_model, tok, harmful).rate)
    >>> report.add("over_refusal", refusal_rate(peft_model, tok, harmless).rate)
    >>> report.add("kl_to_base", kl_to_base(peft_model, tok, neutral))  # uses disable_adapter()
"""

from .behaviour import (
    ARDITI_2024,
    GCG_2023,
    REFUSAL_SUBSTRINGS,
    RateResult,
    is_refusal,
    language_rate,
    refusal_rate,
    target_rate,
)
from .choice import ABResult, ab_accuracy
from .generation import generate
from .language import LANGUAGES, detect_language
from .report import EvalReport
from .side_effects import kl_to_base, perplexity

__all__ = [
    "ARDITI_2024",
    "GCG_2023",
    "LANGUAGES",
    "REFUSAL_SUBSTRINGS",
    "ABResult",
    "EvalReport",
    "RateResult",
    "ab_accuracy",
    "detect_language",
    "generate",
    "is_refusal",
    "kl_to_base",
    "language_rate",
    "perplexity",
    "refusal_rate",
    "target_rate",
]
