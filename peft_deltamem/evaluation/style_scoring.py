"""Automatic scoring of the working-style family: did an answer follow each of the user's preferences?

=============  ======================================================================================================
kind           the answer follows it when
=============  ======================================================================================================
``language``   the language identifier (``py3langid``, a maintained fork of langid.py that ships its model, so it works
               offline) names the preferred language, choosing among English, French, Spanish, German, Italian,
               Portuguese and Dutch (restricting the set keeps short answers from being read as distant languages)
``one_word``   it is exactly one word (a word: a whitespace-separated token with a letter or digit in it)
``capitals``   it has at least two letters and none of them is lower case
``address``    it starts with the form of address (case-insensitive, as a whole word; leading punctuation ignored)
``max_words``  it has between 1 and N words
``bullets``    at least two of its lines are list items (``-``, ``*``, ``•`` or ``1.`` / ``1)`` then text)
=============  ======================================================================================================

An empty answer follows nothing. :func:`style_scores` scores one answer against a list of preferences: ``followed``
(1.0 when every preference is followed) and ``followed_<kind>`` per preference.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

LANGUAGE_CODES: dict[str, str] = {"French": "fr", "English": "en"}
"""Preferred languages (as the user names them) and their ISO 639-1 codes."""

_CANDIDATE_LANGUAGES = ("en", "fr", "es", "de", "it", "pt", "nl")
_BULLET_LINE = re.compile(r"^\s*(?:[-*•‣◦]|\d+[.)])\s+\S")


@functools.lru_cache(maxsize=1)
def _identifier() -> Any:
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:
        raise ImportError(
            "scoring the 'language' preference needs py3langid: pip install 'peft-deltamem[eval]'"
        ) from exc
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(_CANDIDATE_LANGUAGES))
    return identifier


def detect_language(text: str) -> str | None:
    """The ISO 639-1 code of ``text``'s language among the candidates, or None for text without letters."""
    if not any(ch.isalpha() for ch in text):
        return None
    return _identifier().classify(text)[0]


def words(text: str) -> list[str]:
    """The words of ``text``: whitespace-separated tokens holding a letter or digit (list markers do not count)."""
    return [token for token in text.split() if any(ch.isalnum() for ch in token)]


def follows_language(text: str, language: str) -> bool:
    """``text`` is written in ``language`` (a name of :data:`LANGUAGE_CODES`)."""
    if language not in LANGUAGE_CODES:
        raise ValueError(f"unknown language {language!r}; known: {sorted(LANGUAGE_CODES)}")
    return detect_language(text) == LANGUAGE_CODES[language]


def follows_one_word(text: str) -> bool:
    """``text`` is exactly one word."""
    return len(words(text)) == 1


def follows_capitals(text: str) -> bool:
    """``text`` has at least two letters and no lower-case letter."""
    letters = [ch for ch in text if ch.isalpha()]
    return len(letters) >= 2 and not any(ch.islower() for ch in letters)


def follows_address(text: str, address: str) -> bool:
    """``text`` starts with the form of address ``address`` (case-insensitive, whole words)."""
    if not address.strip():
        raise ValueError("the form of address must not be empty")
    return re.match(rf"^\W*{re.escape(address.strip())}(?!\w)", text.strip(), re.IGNORECASE) is not None


def follows_max_words(text: str, limit: int | str) -> bool:
    """``text`` has at least one and at most ``limit`` words."""
    return 1 <= len(words(text)) <= int(limit)


def follows_bullets(text: str) -> bool:
    """At least two lines of ``text`` are list items."""
    return sum(1 for line in text.splitlines() if _BULLET_LINE.match(line)) >= 2


def follows(text: str, kind: str, value: Any = None) -> bool:
    """Whether ``text`` follows one preference (``kind`` and, for language / address / max_words, its ``value``)."""
    if kind == "language":
        return follows_language(text, str(value))
    if kind == "one_word":
        return follows_one_word(text)
    if kind == "capitals":
        return follows_capitals(text)
    if kind == "address":
        return follows_address(text, str(value))
    if kind == "max_words":
        return follows_max_words(text, value)
    if kind == "bullets":
        return follows_bullets(text)
    raise ValueError(
        f"unknown preference kind {kind!r}; known: language, one_word, capitals, address, max_words, bullets"
    )


def style_scores(text: str, preferences: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """``{"followed": all followed, "followed_<kind>": ...}`` (1.0 / 0.0) of ``text`` for ``preferences``, each a
    ``{"kind", "value"}`` mapping."""
    per_kind = {f"followed_{p['kind']}": float(follows(text, p["kind"], p.get("value"))) for p in preferences}
    if not per_kind:
        raise ValueError("style_scores needs at least one preference")
    return {"followed": float(all(per_kind.values())), **per_kind}


__all__ = [
    "LANGUAGE_CODES",
    "detect_language",
    "follows",
    "follows_address",
    "follows_bullets",
    "follows_capitals",
    "follows_language",
    "follows_max_words",
    "follows_one_word",
    "style_scores",
    "words",
]
