"""Behaviour and side-effect evaluation for any causal LM or PEFT-wrapped model.

Behaviour (from greedy generations): :func:`refusal_rate` (over-refusal = the same on harmless prompts),
:func:`target_rate`, :func:`language_rate`; from next-token probabilities: :func:`ab_accuracy` on CAA
A/B items; :func:`mc_accuracy` (binary multiple choice such as TruthfulQA's, by answer
log-likelihood). Side effects on neutral inputs: :func:`kl_to_base` (adapter on vs off, or vs a base model)
and :func:`perplexity`. General ability on plain text: :func:`general_ability` (:func:`piqa_accuracy`,
:func:`blimp_accuracy`, :func:`text_perplexity`); generation health of replies to generic instructions:
:func:`generation_health` (:func:`degenerate_rate`, :func:`duplicate_rate`, :func:`distinct_2`, :func:`shared_opening_rate`).
:class:`EvalReport` collects the numbers.

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
from .choice import ABResult, ab_accuracy, swap_options
from .general import (
    BlimpResult,
    GeneralAbility,
    PiqaResult,
    blimp_accuracy,
    continuation_logprobs,
    general_ability,
    piqa_accuracy,
    text_perplexity,
)
from .generation import generate
from .health import (
    GenerationHealth,
    degenerate_rate,
    distinct_2,
    duplicate_rate,
    generation_health,
    is_degenerate,
    load_generic_instructions,
    shared_opening_rate,
)
from .language import LANGUAGES, detect_language
from .mc import MC_KEYS, MCResult, mc_accuracy, mc_items
from .report import EvalReport
from .side_effects import kl_to_base, perplexity

__all__ = [
    "ARDITI_2024",
    "GCG_2023",
    "LANGUAGES",
    "MC_KEYS",
    "REFUSAL_SUBSTRINGS",
    "ABResult",
    "BlimpResult",
    "EvalReport",
    "GeneralAbility",
    "GenerationHealth",
    "MCResult",
    "PiqaResult",
    "RateResult",
    "ab_accuracy",
    "swap_options",
    "blimp_accuracy",
    "continuation_logprobs",
    "degenerate_rate",
    "detect_language",
    "distinct_2",
    "shared_opening_rate",
    "duplicate_rate",
    "general_ability",
    "generate",
    "generation_health",
    "is_degenerate",
    "is_refusal",
    "kl_to_base",
    "language_rate",
    "load_generic_instructions",
    "mc_accuracy",
    "mc_items",
    "perplexity",
    "piqa_accuracy",
    "refusal_rate",
    "target_rate",
    "text_perplexity",
]
