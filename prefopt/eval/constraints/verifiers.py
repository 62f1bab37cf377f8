"""The constraint benchmark's verifiers: score a response against a task's params, 0..10.

Answer families compare with the one right answer (exact > contains > close > refusal >
off-topic); constraint families average a credit in [0, 1] per constraint. ``answer_ideal`` and
``constraint_ideal`` write a reference response that scores 10.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from prefopt.eval.constraints.words import (
    ADJECTIVES,
    ALL_ITEMS,
    CAPITALS,
    CATEGORIES,
    NUMBER_PHRASES,
    REFUSAL_MARKERS,
    num_words,
)

Params = dict[str, Any]


# ---------------------------------------------------------------- text helpers
def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in _words(text)]


def _n_words(text: str) -> int:
    # IFEval-like: whitespace tokens, but a bare "-" or "..." is punctuation, not a word
    return sum(bool(re.search(r"[A-Za-z0-9]", t)) for t in text.split())


def _has_word(text: str, word: str) -> bool:
    """Whole-word, case-insensitive; simple plurals count (models inflect the given word)."""
    return bool({word, word + "s", word + "es", word[:-1] + "ies"} & set(_tokens(text)))


def _padded(text: str) -> str:
    """Lowercase, non-[a-z-] -> space, padded, so ' phrase ' tests whole-phrase containment."""
    return " " + " ".join(re.sub(r"[^a-z-]", " ", text.lower()).split()) + " "


def _is_refusal(text: str) -> bool:
    return any(m in text.lower() for m in REFUSAL_MARKERS)


# ---------------------------------------------------------------- answer families
# Moved from experiments/make_default_dataset.py: one right answer per task (list: any n items of
# the category), scored exact > contains > close > refusal > off-topic.
def answer(family: str, p: Params) -> str:
    """The canonical answer of an answer-family task (without the sentence wrapper)."""
    if family in ("arithmetic", "larger"):
        return str(p["ans"])
    if family == "list":
        return "\n".join(f"- {w}" for w in p["items"])
    if family == "reverse":
        return ", ".join(reversed(p["words"]))
    if family == "number_words":
        return num_words(p["n"])
    return p[{"case": "target", "capital": "capital", "backwards": "rev"}[family]]


def answer_ideal(family: str, p: Params) -> str:
    return (
        f"The answer is {answer(family, p)}." if p.get("style") == "sentence" else answer(family, p)
    )


def _item(token: str) -> str:
    """Singular category item for a token ("cherries" -> "cherry"), else the token."""
    for cut, add in (("", ""), ("s", ""), ("es", ""), ("ies", "y")):
        if token.endswith(cut) and token[: len(token) - len(cut)] + add in ALL_ITEMS:
            return token[: len(token) - len(cut)] + add
    return token


def _list_items(p: Params, r: str) -> tuple[list[str], int]:
    found = [t for t in map(_item, _tokens(r)) if t in ALL_ITEMS]
    good = [t for t in found if t in CATEGORIES[p["category"]]]
    return good, len(found) - len(good)


def _is_sentence(r: str) -> bool:
    """One line, >= 4 tokens, starts with a capital letter or digit, ends with a period."""
    return (
        "\n" not in r
        and len(r.split()) >= 4
        and r[0].isalnum()
        and r[0] == r[0].upper()
        and r.endswith(".")
    )


def _norm(family: str, text: str) -> str:
    text = text.strip().rstrip(".").strip().strip("'\"")
    return text if family == "case" else text.lower()


def _positional(a: str | list[str], b: str | list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), len(b))


def _exact(family: str, p: Params, r: str) -> bool:
    if p.get("style") == "sentence":
        return _contains(family, p, r) and _is_sentence(r.strip())
    if family != "list":
        return _norm(family, r) == _norm(family, answer(family, p))
    lines = [ln.strip() for ln in r.strip().splitlines()]
    good, bad = _list_items(p, r)
    bullets = all(
        ln[:2] in ("- ", "* ", "• ") and _item(ln[2:].strip().lower()) in good for ln in lines
    )
    return bullets and bad == 0 and len(lines) == len(set(good)) == len(good) == p["n"]


def _contains(family: str, p: Params, r: str) -> bool:
    """Right content, possibly wrapped in extra text or the wrong format."""
    if family in ("arithmetic", "larger"):
        return p["ans"] in [int(x) for x in re.findall(r"\d+", r)]
    if family == "case":
        return p["target"] in _words(r)
    if family == "list":
        good, bad = _list_items(p, r)
        return bad == 0 and len(set(good)) == len(good) == p["n"]
    if family == "reverse":
        return [t for t in _tokens(r) if t in p["words"]] == list(reversed(p["words"]))
    return f" {answer(family, p).lower()} " in _padded(r)


def _closeness(family: str, p: Params, r: str) -> float | None:
    """On-topic but wrong -> closeness in [0, 1]; off-topic -> None."""
    toks = _tokens(r)
    if family in ("arithmetic", "larger"):
        nums = [int(x) for x in re.findall(r"\d+", r)]
        return max(0.0, 1 - abs(nums[-1] - p["ans"]) / 10) if nums else None
    if family == "case":
        hits = [t for t in _words(r) if t.lower() == p["target"].lower()]
        return max((_positional(t, p["target"]) for t in hits), default=None)
    if family == "capital":
        if not set(toks) & {c.lower() for c in CAPITALS.values()}:
            return None
        return 0.5 if p["country"].lower() in toks else 0.0
    if family == "list":
        good, bad = _list_items(p, r)
        return max(0.0, 1 - (abs(len(set(good)) - p["n"]) + bad) / p["n"]) if good else None
    if family == "reverse":
        seq = [t for t in toks if t in p["words"]]
        return _positional(seq, list(reversed(p["words"]))) if len(seq) >= 2 else None
    if family == "backwards":
        hits = [t for t in toks if sorted(t) == sorted(p["word"])]
        return max((_positional(t, p["rev"]) for t in hits), default=None)
    padded = _padded(r)
    m = next((m for phrase, m in NUMBER_PHRASES if f" {phrase} " in padded), None)
    return None if m is None else max(0.0, 1 - abs(m - p["n"]) / 10)


def answer_score(family: str, p: Params, r: str) -> float:
    if _exact(family, p, r):
        return 10.0
    if _contains(family, p, r):
        extra = len(_words(r)) - len(_words(answer(family, p)))
        return round(6.0 - 0.1 * min(10, max(0, extra)), 2)
    close = _closeness(family, p, r)
    if close is not None:
        return round(3.0 + 0.9 * close, 2)
    return 1.0 if _is_refusal(r) else 0.5


# ---------------------------------------------------------------- constraint families
def _credit_score(p: Params, r: str, credits: Sequence[float]) -> float:
    """Score from per-constraint credits in [0, 1]; 10 only when every credit is 1.

    Mentioning the topic is not a constraint (the prompts do not demand it), but it separates
    an on-topic near miss (3-9) from an off-topic reply (0.5-2.9) and a refusal (1).
    """
    on_topic = _has_word(r, p["key"])
    if not on_topic and _is_refusal(r):
        return 1.0
    mean = sum(credits) / len(credits)
    if mean >= 1.0:
        return 10.0
    return round(3.0 + 6.0 * mean if on_topic else 0.5 + 2.4 * mean, 2)


def _one_sentence(r: str) -> bool:
    r = r.strip()
    return "\n" not in r and len(re.findall(r"[.!?]+(?=\s|$)", r)) <= 1


def _lowercase_credits(r: str) -> list[float]:
    letters = [c for c in r if c.isalpha()]
    upper = sum(c.isupper() for c in letters)
    return [min(_n_words(r), 3) / 3, 1 - upper / len(letters) if letters else 0.0]


def _ending_credits(p: Params, r: str) -> list[float]:
    text, phrase = r.strip().strip('"').lower(), p["phrase"].lower()
    flat, flat_phrase = " ".join(_tokens(r)), " ".join(_tokens(phrase))
    if text.endswith(phrase):
        end = 1.0
    elif flat.endswith(flat_phrase):  # right words, punctuation or case off
        end = 0.8
    elif flat_phrase in flat:
        end = 0.6
    else:
        end = 0.4 * sum(_has_word(r, t) for t in flat_phrase.split()) / len(flat_phrase.split())
    body = _n_words(r) - (_n_words(phrase) if flat_phrase in flat else 0)
    return [end, min(body, 3) / 3]  # the phrase alone is not "one fact"


def constraint_score(family: str, p: Params, r: str) -> float:
    if family == "word_count":
        credits = [0.75 ** abs(_n_words(r) - p["n"])]
    elif family == "keywords":
        credits = [*(float(_has_word(r, w)) for w in p["words"]), float(_one_sentence(r))]
    elif family == "lowercase":
        credits = _lowercase_credits(r)
    elif family == "ending":
        credits = _ending_credits(p, r)
    else:
        credits = [*_lowercase_credits(r), float(_has_word(r, p["words"][0]))]
    return _credit_score(p, r, credits)


def constraint_ideal(family: str, p: Params) -> str:
    t = p["topic"]
    if family == "word_count":
        adjectives = ADJECTIVES[: p["n"] - len(t.split())]
        return f"{t.capitalize()}: {', '.join(adjectives)}."
    if family == "keywords":
        return f"When I think of {t}, I picture a {p['words'][0]} and a {p['words'][1]}."
    if family == "lowercase":
        return f"i like learning about {t}."
    if family == "ending":
        return f"One fact about {t} is that people have studied it for centuries. {p['phrase']}"
    return f"{t} and a {p['words'][0]} go well together in my mind."
