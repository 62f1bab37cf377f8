"""The constraint benchmark's thirteen families: a generator of (prompt, params) per family.

Each generator draws from one ``random.Random``; the order of its draws is part of the tasks'
identity (changing it changes every generated task), and so is the order of ``FAMILIES``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from prefopt.eval.constraints.verifiers import (
    Params,
    answer_ideal,
    answer_score,
    constraint_ideal,
    constraint_score,
)
from prefopt.eval.constraints.words import (
    ALL_ITEMS,
    CAPITALS,
    CATEGORIES,
    END_PHRASES,
    KEYWORDS,
    ONES,
    PROMPTS,
    TOPIC_NAMES,
    TOPICS,
    WORDS,
)


def _pick(rng: random.Random, templates: list[str], **fill: Any) -> str:
    return rng.choice(templates).format(**fill)


# ---------------------------------------------------------------- answer families
def _styled(rng: random.Random, family: str, p: Params, **fill: Any) -> tuple[str, Params]:
    if f"{family}/sentence" in PROMPTS and rng.random() < 1 / 3:
        return _pick(rng, PROMPTS[f"{family}/sentence"], **fill), {**p, "style": "sentence"}
    return _pick(rng, PROMPTS[family], **fill), p


def gen_arithmetic(rng: random.Random) -> tuple[str, Params]:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else rng.sample(range(2, 90), 2)
    a, b = (a, b) if op == "*" else (max(a, b), min(a, b))
    p = {"a": a, "b": b, "op": op, "ans": {"+": a + b, "-": a - b, "*": a * b}[op]}
    # an answer equal to an operand would let "echo the prompt" score as correct
    return gen_arithmetic(rng) if p["ans"] in (a, b) else _styled(rng, "arithmetic", p, **p)


def gen_larger(rng: random.Random) -> tuple[str, Params]:
    a, b = rng.sample(range(1, 1000), 2)
    return _styled(rng, "larger", {"a": a, "b": b, "ans": max(a, b)}, a=a, b=b)


def gen_case(rng: random.Random) -> tuple[str, Params]:
    word, mode = rng.choice(WORDS), rng.choice(["upper", "lower"])
    shown = rng.choice([word.title(), word if mode == "upper" else word.upper()])
    p = {"word": word, "mode": mode, "target": word.upper() if mode == "upper" else word}
    return _styled(rng, "case", p, s=shown, m=mode)


def gen_capital(rng: random.Random) -> tuple[str, Params]:
    country, cap = rng.choice(sorted(CAPITALS.items()))
    return _styled(rng, "capital", {"country": country, "capital": cap}, c=country)


def gen_list(rng: random.Random) -> tuple[str, Params]:
    cat, n = rng.choice(sorted(CATEGORIES)), rng.randint(2, 7)
    p = {"category": cat, "n": n, "items": rng.sample(CATEGORIES[cat], n)}
    return _styled(rng, "list", p, n=rng.choice([str(n), ONES[n]]), c=cat)


def gen_reverse(rng: random.Random) -> tuple[str, Params]:
    words = rng.sample(ALL_ITEMS, rng.randint(3, 5))
    return _styled(rng, "reverse", {"words": words}, l=", ".join(words))


def gen_backwards(rng: random.Random) -> tuple[str, Params]:
    word = rng.choice([w for w in WORDS if len(w) >= 4])
    return _styled(rng, "backwards", {"word": word, "rev": word[::-1]}, w=word)


def gen_number_words(rng: random.Random) -> tuple[str, Params]:
    n = rng.randint(21, 998)
    return _styled(rng, "number_words", {"n": n}, n=n)


# ---------------------------------------------------------------- constraint families
def _topic(rng: random.Random) -> Params:
    topic = rng.choice(TOPIC_NAMES)
    return {"topic": topic, "key": TOPICS[topic]}


def _gen_constraint(family: str, rng: random.Random) -> tuple[str, Params]:
    p = _topic(rng)
    if family == "word_count":
        p["n"] = rng.randint(3, 12)
    elif family == "keywords":
        p["words"] = rng.sample(KEYWORDS, 2)
    elif family == "ending":
        p["phrase"] = rng.choice(END_PHRASES)
    elif family == "lowercase_keyword":
        p["words"] = [rng.choice(KEYWORDS)]
    words = p.get("words", ["", ""])
    fill = {"t": p["topic"], "n": p.get("n"), "e": p.get("phrase"), "a": words[0], "b": words[-1]}
    return _pick(rng, PROMPTS[family], **fill), p


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Family:
    """A task family: draws (prompt, params) and scores a response against params."""

    generate: Callable[[random.Random], tuple[str, Params]]
    score: Callable[[Params, str], float]  # 0..10, exactly 10.0 iff every constraint is met
    ideal: Callable[[Params], str]  # a reference response that passes


ANSWER_GENERATORS = {
    fn.__name__.removeprefix("gen_"): fn
    for fn in (gen_arithmetic, gen_larger, gen_case, gen_capital, gen_list, gen_reverse)
    + (gen_backwards, gen_number_words)
}
CONSTRAINT_FAMILIES = ("word_count", "keywords", "lowercase", "ending", "lowercase_keyword")
FAMILIES: dict[str, Family] = {
    **{
        name: Family(gen, partial(answer_score, name), partial(answer_ideal, name))
        for name, gen in ANSWER_GENERATORS.items()
    },
    **{
        name: Family(
            partial(_gen_constraint, name),
            partial(constraint_score, name),
            partial(constraint_ideal, name),
        )
        for name in CONSTRAINT_FAMILIES
    },
}
