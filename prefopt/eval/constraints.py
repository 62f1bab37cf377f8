"""Offline constraint-following benchmark: prompt generators and programmatic verifiers.

Thirteen task families, each generated from word lists in this file and scored by reading the
response text. Stdlib only; the same arguments give the same tasks on every machine. Scores are
graded 0..10 so a group of sampled responses rarely ties:

    answer families (arithmetic larger case capital list reverse backwards number_words):
        10 exact | 5-6 right content, wrong format | 3-3.9 on-topic but wrong
        | 1 refusal | 0.5 off-topic | 0 empty
    constraint families (word_count keywords lowercase ending lowercase_keyword), IFEval-style:
        10 every constraint met | 3-9 on-topic, by the mean per-constraint credit
        | 0.5-2.9 topic never mentioned, by the same credit | 1 refusal | 0 empty

Splits are decided by a hash of the prompt text, so train and heldout never share a prompt.

    python -m prefopt.eval.constraints --split heldout --n 64 --seed 0 --out tasks.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

Params = dict[str, Any]
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20
MAX_DRAWS = 20_000  # per task; only hit once a family's pool of distinct prompts runs dry


def _w(text: str) -> list[str]:
    return text.split()


# ---------------------------------------------------------------- word lists
CATEGORIES: dict[str, list[str]] = {
    "fruits": _w("apple banana cherry grape lemon mango peach pear plum kiwi melon papaya"),
    "animals": _w("cat dog horse cow sheep goat lion tiger zebra rabbit mouse fox wolf bear"),
    "colours": _w("red blue green yellow purple black white pink brown grey"),
    "vegetables": _w("carrot potato onion pepper cabbage lettuce spinach celery leek"),
    "vehicles": _w("car bus train bike boat truck plane tram scooter van"),
    "birds": _w("robin sparrow eagle owl crow duck swan pigeon parrot hawk"),
    "instruments": _w("piano guitar violin drum flute trumpet harp cello"),
    "tools": _w("hammer wrench drill shovel rake chisel pliers ladder"),
}
ALL_ITEMS = sorted({w for items in CATEGORIES.values() for w in items})
CAPITALS = dict(
    pair.split(":")
    for pair in _w(
        "France:Paris Germany:Berlin Italy:Rome Spain:Madrid Portugal:Lisbon Greece:Athens "
        "Norway:Oslo Sweden:Stockholm Finland:Helsinki Denmark:Copenhagen Poland:Warsaw "
        "Austria:Vienna Hungary:Budapest Ireland:Dublin Russia:Moscow Egypt:Cairo Kenya:Nairobi "
        "Japan:Tokyo China:Beijing Thailand:Bangkok Vietnam:Hanoi Peru:Lima Chile:Santiago "
        "Canada:Ottawa Australia:Canberra Turkey:Ankara Iran:Tehran Iraq:Baghdad Cuba:Havana "
        "Belgium:Brussels Netherlands:Amsterdam Switzerland:Bern Czechia:Prague Ukraine:Kyiv "
        "Romania:Bucharest Nigeria:Abuja Ghana:Accra Morocco:Rabat Colombia:Bogota "
        "Venezuela:Caracas Indonesia:Jakarta Philippines:Manila Nepal:Kathmandu Bulgaria:Sofia "
        "Serbia:Belgrade Croatia:Zagreb Slovakia:Bratislava Latvia:Riga Lithuania:Vilnius "
        "Estonia:Tallinn Iceland:Reykjavik Senegal:Dakar Tunisia:Tunis Algeria:Algiers "
        "Sudan:Khartoum Uganda:Kampala Zimbabwe:Harare Pakistan:Islamabad Bangladesh:Dhaka "
        "Syria:Damascus Jordan:Amman Lebanon:Beirut Qatar:Doha Ecuador:Quito Uruguay:Montevideo "
        "Jamaica:Kingston Brazil:Brasilia"
    )
)
EXTRA_WORDS = _w(
    "garden window pencil rocket silver planet forest bottle candle marble basket button castle "
    "dragon engine feather jacket kettle lantern mirror needle pocket puzzle saddle shadow "
    "thunder tunnel velvet wallet whistle blanket carpet cookie helmet island jungle ribbon "
    "statue ticket anchor"
)
WORDS = sorted(set(ALL_ITEMS) | set(EXTRA_WORDS))
# topic as it appears in a prompt -> the word whose mention (or plural) counts as "on topic"
TOPICS = {
    topic.replace("_", " "): key or topic.removesuffix("s")
    for topic, _, key in (
        pair.partition(":")
        for pair in _w(
            "the_ocean:ocean coffee elephants the_moon:moon winter bicycles libraries:library "
            "volcanoes:volcano honey_bees:bee rain mountains chess:chess bread the_desert:desert "
            "trains music gardens penguins the_sun:sun forests rivers owls snow tea cities:city "
            "islands storms clocks cats dogs books stars apples football the_wind:wind bridges "
            "rainbows dolphins candles kites the_internet:internet chocolate pizza rockets "
            "dinosaurs butterflies:butterfly lighthouses castles robots trees clouds pianos cheese "
            "whales spiders frogs glaciers caves sharks tigers horses airplanes umbrellas maps "
            "mushrooms earthquakes the_brain:brain sleep friendship summer autumn paper salt gold "
            "glass:glass deserts:desert bees:bee"
        )
    )
}
TOPIC_NAMES = sorted(TOPICS)
KEYWORDS = _w(
    "journey window morning shadow whisper mirror lantern thunder velvet harbor meadow puzzle "
    "feather compass ladder secret blanket pocket ribbon tunnel whistle anchor treasure silence"
)
END_PHRASES = [
    "Is there anything else I can help with?",
    "That is all.",
    "Any other questions?",
    "Hope this helps!",
    "Thanks for asking.",
    "Have a nice day!",
    "The end.",
    "And that is a fact.",
]
ADJECTIVES = _w("calm bright gentle quiet vast old simple lovely strange familiar warm cool")
REFUSAL_MARKERS = ("not sure", "can't", "cannot", "don't know", "sorry", "rather not", "no idea")
ONES = _w(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
TENS = _w("_ _ twenty thirty forty fifty sixty seventy eighty ninety")


def num_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")
    rest = n % 100
    return f"{ONES[n // 100]} hundred" + (f" {num_words(rest)}" if rest else "")


NUMBER_PHRASES = sorted(((num_words(m), m) for m in range(1, 1000)), key=lambda p: -len(p[0]))


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


def _templates(block: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in block.strip().splitlines():
        name, template = line.split(": ", 1)
        out.setdefault(name, []).append(template)
    return out


def _pick(rng: random.Random, templates: list[str], **fill: Any) -> str:
    return rng.choice(templates).format(**fill)


# ---------------------------------------------------------------- answer families
# "family: template" lines. A "<family>/sentence" prompt (drawn a third of the time) asks for a
# complete sentence, which then becomes the exact answer and the bare answer a format miss.
PROMPTS = _templates("""
arithmetic: What is {a} {op} {b}? Reply with just the number.
arithmetic: Compute {a} {op} {b}. Answer with only the number.
arithmetic: Calculate {a} {op} {b} and reply with the number only.
arithmetic/sentence: What is {a} {op} {b}? Answer in a complete sentence.
larger: Which is larger, {a} or {b}? Reply with just the number.
larger: Which number is bigger: {a} or {b}? Answer with the number only.
larger/sentence: Which is larger, {a} or {b}? Answer in a complete sentence.
case: Write the word '{s}' in {m}case. Reply with only the word.
case: Convert '{s}' to {m}case and reply with just the result.
capital: What is the capital of {c}? Answer in one word.
capital: Name the capital city of {c}. Reply with just the city name.
capital: Which city is the capital of {c}? One word only.
capital/sentence: What is the capital of {c}? Answer in a complete sentence.
list: List {n} {c} as a bullet list.
list: Name {n} {c}. Format them as a bullet list, one per line.
list: Give me {n} {c} as a bullet list, one per line, nothing else.
list: Write a bullet list of {n} {c}.
reverse: Reverse the order of these words: {l}. Reply with the words separated by commas.
reverse: Write this list in reverse order, comma-separated, nothing else: {l}.
reverse: Reverse the list {l}. Reply with only the reversed list.
backwards: Spell the word '{w}' backwards. Reply with only the reversed word.
backwards: What is '{w}' spelled backwards? Answer with just the word.
backwards: Write '{w}' with its letters in reverse order. Reply with only that.
number_words: Write the number {n} in words. Reply with only the words.
number_words: Spell out {n} in English words, nothing else.
number_words: How do you write {n} in words? Answer with just the words.
number_words/sentence: How is {n} written in words? Answer in a complete sentence.
word_count: Describe {t} in exactly {n} words.
word_count: Write exactly {n} words about {t}.
keywords: Write one sentence about {t} that uses the words '{a}' and '{b}'.
keywords: Write a single sentence about {t} using the words '{a}' and '{b}'.
lowercase: Write a short sentence about {t} using only lowercase letters.
lowercase: Write one short sentence about {t}. Use only lowercase letters, no capitals.
lowercase: Describe {t} in one short sentence, written entirely in lowercase letters.
lowercase: Say something about {t} in a short sentence using only lowercase letters.
ending: Tell me one fact about {t}. End your reply with the exact phrase '{e}'
ending: Share one fact about {t}, and end your reply with the exact phrase '{e}'
lowercase_keyword: Write a sentence about {t} using only lowercase letters and the word '{a}'.
lowercase_keyword: Using only lowercase letters, write one sentence about {t} that includes '{a}'.
""")


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


def _answer_ideal(family: str, p: Params) -> str:
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


def _answer_score(family: str, p: Params, r: str) -> float:
    if _exact(family, p, r):
        return 10.0
    if _contains(family, p, r):
        extra = len(_words(r)) - len(_words(answer(family, p)))
        return round(6.0 - 0.1 * min(10, max(0, extra)), 2)
    close = _closeness(family, p, r)
    if close is not None:
        return round(3.0 + 0.9 * close, 2)
    return 1.0 if _is_refusal(r) else 0.5


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


def _constraint_score(family: str, p: Params, r: str) -> float:
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


def _constraint_ideal(family: str, p: Params) -> str:
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


# ---------------------------------------------------------------- public API
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
        name: Family(gen, partial(_answer_score, name), partial(_answer_ideal, name))
        for name, gen in ANSWER_GENERATORS.items()
    },
    **{
        name: Family(
            partial(_gen_constraint, name),
            partial(_constraint_score, name),
            partial(_constraint_ideal, name),
        )
        for name in CONSTRAINT_FAMILIES
    },
}


@dataclass(frozen=True)
class Task:
    id: str
    family: str
    prompt: str  # the user message text
    params: dict = field(hash=False)  # JSON-serialisable; everything the verifier needs


@dataclass(frozen=True)
class Verdict:
    score: float  # 0..10 graded
    passed: bool  # every constraint met


def split_of(prompt: str) -> str:
    """The split a prompt text belongs to, by a stable hash (about HELDOUT_PERCENT% heldout)."""
    bucket = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def make_tasks(
    split: str, n: int, seed: int = 0, families: Sequence[str] | None = None
) -> list[Task]:
    """``n`` tasks of ``split``, families in round-robin order (so a smaller n is a prefix)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    if families is None:
        names = list(FAMILIES)
    else:  # a lone name would otherwise be read as its letters
        names = [families] if isinstance(families, str) else list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown families {unknown or names}; valid families: {sorted(FAMILIES)}")
    if n < 0:
        raise ValueError(f"n={n}: expected n >= 0")
    # one stream per family, so choosing other families does not change this family's tasks
    # the seed string keeps the module's old name: changing it would change every task
    rngs = {f: random.Random(f"prefopt.constraints:{seed}:{f}") for f in names}
    seen: set[str] = set()
    tasks = []
    for i in range(n):
        family = names[i % len(names)]
        for _ in range(MAX_DRAWS):
            prompt, params = FAMILIES[family].generate(rngs[family])
            if prompt not in seen and split_of(prompt) == split:
                break
        else:
            have = sum(t.family == family for t in tasks)
            raise ValueError(
                f"family {family!r} ran out of distinct {split} prompts after {have}; ask for fewer"
            )
        seen.add(prompt)
        tasks.append(Task(f"{split}-{i:06d}", family, prompt, params))
    return tasks


def _family_params(row: Mapping, at: str) -> tuple[str, Params]:
    if not isinstance(row, Mapping):
        raise ValueError(f"{at}expected a task or an object, got {type(row).__name__}")
    for key in ("family", "params"):
        if key not in row:
            raise ValueError(f"{at}missing key '{key}'")
    family, params = row["family"], row["params"]
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(
            f"{at}key 'family': unknown family {family!r}; valid families: {sorted(FAMILIES)}"
        )
    if not isinstance(params, Mapping):
        raise ValueError(f"{at}key 'params': expected an object, got {type(params).__name__}")
    return family, dict(params)


def verify(task: Task | Mapping, response: str) -> Verdict:
    """Score one response; ``task`` may be a Task or a row with "family" and "params"."""
    family, params = (
        (task.family, task.params) if isinstance(task, Task) else _family_params(task, "")
    )
    if not (response or "").strip():  # empty or None (a failed generation) scores lowest
        return Verdict(0.0, False)
    score = FAMILIES[family].score(params, response)
    return Verdict(score, score >= 10.0)


def ideal_response(task: Task | Mapping) -> str:
    """A reference response that passes ``task`` (documentation and tests)."""
    family, params = (
        (task.family, task.params) if isinstance(task, Task) else _family_params(task, "")
    )
    return FAMILIES[family].ideal(params)


def task_row(task: Task) -> dict:
    """The JSONL row of a task; a local-JSONL prompt set reads its "prompt" messages."""
    prompt = [{"role": "user", "content": task.prompt}]
    return {"id": task.id, "prompt": prompt, "family": task.family, "params": task.params}


def task_from_row(row: Mapping, where: str = "") -> Task:
    """Inverse of :func:`task_row`; "prompt" may also be a plain string."""
    at = f"{where}: " if where else ""
    family, params = _family_params(row, at)
    try:  # a params object missing a field would otherwise fail later, inside the verifier
        FAMILIES[family].score(params, FAMILIES[family].ideal(params))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ValueError(f"{at}key 'params': bad or missing field {e} for family {family!r}") from e
    if "prompt" not in row:
        raise ValueError(f"{at}missing key 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], Mapping):
        prompt = prompt[-1].get("content")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{at}key 'prompt': expected a string or a list ending in a user message")
    task_id = row.get("id", "")
    if not isinstance(task_id, str):
        raise ValueError(f"{at}key 'id': expected a string, got {type(task_id).__name__}")
    return Task(task_id, family, prompt, params)


def satisfaction(tasks: Sequence[Task | Mapping], responses: Sequence[str]) -> dict[str, float]:
    """Pass rate and mean score overall, and the pass rate of each family present."""
    if len(tasks) != len(responses):
        raise ValueError(f"{len(tasks)} tasks but {len(responses)} responses")
    verdicts = [verify(t, r) for t, r in zip(tasks, responses, strict=True)]
    fams = [t.family if isinstance(t, Task) else t["family"] for t in tasks]
    n = len(verdicts)
    out: dict[str, float] = {
        "satisfaction": sum(v.passed for v in verdicts) / n if n else 0.0,
        "score": sum(v.score for v in verdicts) / n if n else 0.0,
        "n": n,
    }
    for fam in sorted(set(fams)):
        mine = [v.passed for v, f in zip(verdicts, fams, strict=True) if f == fam]
        out[f"satisfaction/{fam}"] = sum(mine) / len(mine)
    return out


def main(argv: list[str] | None = None) -> list[Task]:
    ap = argparse.ArgumentParser(description="Write constraint-following tasks as JSONL rows.")
    ap.add_argument("--split", choices=SPLITS, default="heldout")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default=None, help=f"comma-separated subset of {list(FAMILIES)}")
    ap.add_argument("--out", default=None, help="output .jsonl (default: stdout)")
    args = ap.parse_args(argv)
    families = args.families.split(",") if args.families else None
    tasks = make_tasks(args.split, args.n, args.seed, families)
    lines = "".join(json.dumps(task_row(t), ensure_ascii=False) + "\n" for t in tasks)
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="\n") as f:
            f.write(lines)
    else:
        sys.stdout.write(lines)
    counts = Counter(t.family for t in tasks)
    log = sys.stdout if args.out else sys.stderr  # keep stdout pure JSONL when it carries rows
    print(f"{len(tasks)} {args.split} tasks -> {args.out or 'stdout'}", file=log)
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())), file=log)
    return tasks


if __name__ == "__main__":
    main()
