"""A tiny stopword-vote language identifier for English, French, German and Spanish.

Enough to score "answer in French" steering on short model replies without a dependency. Each word
that is a common function word of a language votes for it; a word shared by ``k`` languages (``la``,
``de``, ``en``) gives each ``1/k``. The language with the most votes wins.

Limits: only ``en``/``fr``/``de``/``es``; other languages come back as ``"unknown"`` when they share
no stopwords, but closely related ones are misread (Italian and Portuguese often as ``es`` or ``fr``,
Dutch as ``de`` or ``en``). Texts with fewer than about five words, lists of names, code, or text
with no function words give ``"unknown"`` or a guess from one or two words; a mixed-language text
gets its majority language. Scripts without spaces between words (Chinese, Japanese, Thai) are not
handled.
"""

from __future__ import annotations

import re
from collections import Counter


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


STOPWORDS: dict[str, frozenset[str]] = {
    "en": _words(
        "the and of to is in that it for you with as are was this on be have not but they by from or an at "
        "which we can will your there their has what would about if my so these should because were been "
        "do does how when who"
    ),
    "fr": _words(
        "le la les et est un une des du de en que qui dans pour pas sur au aux avec ce cette il elle nous "
        "vous sont mais ou je ne se son sa ses par plus être avoir très comme leur été c l d j qu aussi "
        "peut fait même"
    ),
    "de": _words(
        "der die das und ist nicht ein eine zu den dem des mit sich auf für von sie es ich du wir ihr auch "
        "als an wie im dass oder aber wenn noch nur werden kann sind hat bei einen einem einer aus um "
        "wird sehr"
    ),
    "es": _words(
        "el la los las y es un una de del en que por con para no se lo su sus al como más pero o está "
        "son este esta muy también yo tú porque hay ser cuando sin sobre todo le les puede hace"
    ),
}
LANGUAGES: tuple[str, ...] = tuple(STOPWORDS)
_WORD = re.compile(r"[^\W\d_]+")
_SHARE: dict[str, float] = {
    w: 1.0 / sum(w in words for words in STOPWORDS.values()) for words in STOPWORDS.values() for w in words
}


def check_language(language: str) -> str:
    if language not in STOPWORDS:
        raise ValueError(f"unknown language {language!r}; detect_language supports {list(LANGUAGES)}.")
    return language


def language_scores(text: str) -> dict[str, float]:
    """Stopword votes per language for ``text`` (case-insensitive; apostrophes split words: ``l'eau``)."""
    counts = Counter(w for w in _WORD.findall(text.lower()) if w in _SHARE)
    return {lang: sum(n * _SHARE[w] for w, n in counts.items() if w in words) for lang, words in STOPWORDS.items()}


def detect_language(text: str, min_votes: float = 1.0) -> str:
    """``"en"``, ``"fr"``, ``"de"``, ``"es"``, or ``"unknown"`` (no clear winner, or fewer than ``min_votes``).

    Example:
        >>> detect_language("Le chat est sur la table et il dort.")
        'fr'
    """
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a string, got {type(text).__name__}.")
    scores = language_scores(text)
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    (best, top), (_, second) = ranked[0], ranked[1]
    if top < min_votes or top == second:
        return "unknown"
    return best
