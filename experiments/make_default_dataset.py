"""Build prefopt's shipped default multi-response dataset (synthetic, verifiable, deterministic).

Each row is a short instruction with a programmatically checkable constraint (8 task families)
and K=4 responses of graded quality, scored by a per-family verifier that reads the text:
10 = correct and well formatted, ~5-6 = correct content but format violated, ~3-4 = on-topic but
wrong, 0.5-1 = off-topic or refusal. Stdlib only, no network; same seed -> byte-identical files.

    python experiments/make_default_dataset.py [--seed 0] [--n-train 400] [--n-eval 64] \
        [--out-dir prefopt/assets]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

Params = dict[str, Any]


def _w(text: str) -> list[str]:
    return text.split()


CATEGORIES: dict[str, list[str]] = {
    "fruits": _w("apple banana cherry grape lemon mango peach pear plum kiwi melon papaya"),
    "animals": _w("cat dog horse cow sheep goat lion tiger zebra rabbit mouse fox wolf bear"),
    "colours": _w("red blue green yellow purple black white pink brown grey"),
    "vegetables": _w("carrot potato onion pepper cabbage lettuce spinach celery leek"),
    "vehicles": _w("car bus train bike boat truck plane tram scooter van"),
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
        "Venezuela:Caracas Indonesia:Jakarta Philippines:Manila Nepal:Kathmandu"
    )
)
EXTRA_WORDS = _w("garden window pencil rocket silver planet forest bottle candle marble")
OFF_TOPIC = [
    "I'm not sure.",
    "Sorry, I can't help with that.",
    "I don't know the answer to that.",
    "Hmm, that is tricky. Maybe ask someone else?",
    "Could you tell me more about what you need?",
    "Let's talk about something else today.",
    "No idea.",
    "Pass.",
    "Maybe.",
    "Who knows?",
    "Hello! How can I help you today?",
    "That sounds like a fun question, but I would rather not answer it.",
]
REFUSAL_MARKERS = ("not sure", "can't", "don't know", "sorry", "rather not", "no idea")
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


# ---------------------------------------------------------------- text helpers + verifier
def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def _padded(text: str) -> str:
    """Lowercase, non-[a-z-] -> space, padded, so ' phrase ' tests whole-phrase containment."""
    return " " + " ".join(re.sub(r"[^a-z-]", " ", text.lower()).split()) + " "


def _norm(family: str, text: str) -> str:
    text = text.strip().rstrip(".").strip().strip("'\"")
    return text if family == "case" else text.lower()


def _positional(a: str | list[str], b: str | list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), len(b))


def answer(family: str, p: Params) -> str:
    """The canonical ideal response (list family: any n distinct category items also pass)."""
    if family in ("arithmetic", "larger"):
        return str(p["ans"])
    if family == "list":
        return "\n".join(f"- {w}" for w in p["items"])
    if family == "reverse":
        return ", ".join(reversed(p["words"]))
    if family == "number_words":
        return num_words(p["n"])
    return {"case": p.get("target"), "capital": p.get("capital"), "backwards": p.get("rev")}[family]


def _list_items(p: Params, r: str) -> tuple[list[str], int]:
    found = [t for t in (w.lower() for w in _words(r)) if t in ALL_ITEMS]
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


def _exact(family: str, p: Params, r: str) -> bool:
    if p.get("style") == "sentence":
        return _contains(family, p, r) and _is_sentence(r.strip())
    if family != "list":
        return _norm(family, r) == _norm(family, answer(family, p))
    lines = [ln.strip() for ln in r.strip().splitlines()]
    good, bad = _list_items(p, r)
    bullets = all(ln.startswith("- ") and ln[2:].strip().lower() in good for ln in lines)
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
        seq = [w for w in (t.lower() for t in _words(r)) if w in p["words"]]
        return seq == list(reversed(p["words"]))
    return f" {answer(family, p).lower()} " in _padded(r)


def _closeness(family: str, p: Params, r: str) -> float | None:
    """On-topic but wrong -> closeness in [0, 1]; off-topic -> None."""
    toks = [t.lower() for t in _words(r)]
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


def verify(family: str, params: Params, response: str) -> float:
    """Score a response by checking its text against the instance's constraints."""
    if _exact(family, params, response):
        return 10.0
    if _contains(family, params, response):
        extra = len(_words(response)) - len(_words(answer(family, params)))
        return round(6.0 - 0.1 * min(10, max(0, extra)), 2)
    close = _closeness(family, params, response)
    if close is not None:
        return round(3.0 + 0.9 * close, 2)
    return 1.0 if any(m in response.lower() for m in REFUSAL_MARKERS) else 0.5


# ---------------------------------------------------------------- instance generators
# Each gen_<family> returns (prompt, params, [correct, format-violated, wrong]); an off-topic
# reply is appended later. _pick chooses one template ("|"-separated or a list) at random.
Instance = tuple[str, Params, list[str]]


PROMPTS: dict[str, list[str]] = {
    "arithmetic": [
        "What is {a} {op} {b}? Reply with just the number.",
        "Compute {a} {op} {b}. Answer with only the number.",
        "Calculate {a} {op} {b} and reply with the number only.",
    ],
    "larger": [
        "Which is larger, {a} or {b}? Reply with just the number.",
        "Which number is bigger: {a} or {b}? Answer with the number only.",
    ],
    "case": [
        "Write the word '{s}' in {m}case. Reply with only the word.",
        "Convert '{s}' to {m}case and reply with just the result.",
    ],
    "capital": [
        "What is the capital of {c}? Answer in one word.",
        "Name the capital city of {c}. Reply with just the city name.",
        "Which city is the capital of {c}? One word only.",
    ],
    "list": [
        "List {n} {c} as a bullet list.",
        "Name {n} {c}. Format them as a bullet list, one per line.",
        "Give me {n} {c} as a bullet list, one per line, nothing else.",
    ],
    "reverse": [
        "Reverse the order of these words: {l}. Reply with the words separated by commas.",
        "Write this list in reverse order, comma-separated, nothing else: {l}.",
        "Reverse the list {l}. Reply with only the reversed list.",
    ],
    "backwards": [
        "Spell the word '{w}' backwards. Reply with only the reversed word.",
        "What is '{w}' spelled backwards? Answer with just the word.",
    ],
    "number_words": [
        "Write the number {n} in words. Reply with only the words.",
        "Spell out {n} in English words, nothing else.",
        "How do you write {n} in words? Answer with just the words.",
    ],
}


SENTENCE_PROMPTS: dict[str, list[str]] = {
    "arithmetic": ["What is {a} {op} {b}? Answer in a complete sentence."],
    "larger": ["Which is larger, {a} or {b}? Answer in a complete sentence."],
    "capital": ["What is the capital of {c}? Answer in a complete sentence."],
    "number_words": ["How is {n} written in words? Answer in a complete sentence."],
}


def _pick(rng: random.Random, templates: str | list[str], **fill: Any) -> str:
    options = templates.split("|") if isinstance(templates, str) else templates
    return rng.choice(options).format(**fill)


def _styled(rng: random.Random, family: str, p: Params, fill: Params, res: list[str]) -> Instance:
    """Pick the prompt. A third of SENTENCE_PROMPTS families instead ask for a complete sentence:
    the sentence-shaped reply becomes the ideal and the bare answer the format violation."""
    if family in SENTENCE_PROMPTS and rng.random() < 1 / 3:
        p["style"] = "sentence"
        return _pick(rng, SENTENCE_PROMPTS[family], **fill), p, [res[1], res[0], res[2]]
    return _pick(rng, PROMPTS[family], **fill), p, res


def _numeric(rng: random.Random, family: str, p: Params, w: int, fmt: str) -> Instance:
    wrong = _pick(rng, "{w}|The answer is {w}.|I think it is {w}.", w=w)
    return _styled(rng, family, p, p, [str(p["ans"]), _pick(rng, fmt, **p), wrong])


def gen_arithmetic(rng: random.Random) -> Instance:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else rng.sample(range(2, 90), 2)
    a, b = (a, b) if op == "*" else (max(a, b), min(a, b))
    p = {"a": a, "b": b, "op": op, "ans": {"+": a + b, "-": a - b, "*": a * b}[op]}
    if p["ans"] in (a, b):
        return gen_arithmetic(rng)
    w = p["ans"] + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if p["ans"] + d >= 0])
    fmt = "The answer is {ans}.|Sure! {a} {op} {b} = {ans}.|{ans} is the result.|"
    return _numeric(rng, "arithmetic", p, w, fmt + "Let me compute: {a} {op} {b} equals {ans}.")


def gen_larger(rng: random.Random) -> Instance:
    a, b = rng.sample(range(1, 1000), 2)
    p = {"a": a, "b": b, "ans": max(a, b), "small": min(a, b)}
    fmt = "{ans} is larger than {small}.|The larger number is {ans}.|Sure! It is {ans}."
    return _numeric(rng, "larger", p, min(a, b), fmt)


def gen_case(rng: random.Random) -> Instance:
    word, mode = rng.choice(ALL_ITEMS + EXTRA_WORDS), rng.choice(["upper", "lower"])
    target = word.upper() if mode == "upper" else word
    shown = rng.choice([word.title(), word if mode == "upper" else word.upper()])
    k = rng.randint(1, len(word) - 1)
    partial = target[:k] + (target[k:].lower() if mode == "upper" else target[k:].upper())
    wrong = rng.choice(sorted({shown, word.title(), partial} - {target}))
    fmt = _pick(rng, "Sure! {t}|In {m}case it is {t}.|Here you go: {t}", t=target, m=mode)
    p = {"word": word, "mode": mode, "target": target}
    res = [target, fmt, _pick(rng, "{w}|Here it is: {w}", w=wrong)]
    return _styled(rng, "case", p, {"s": shown, "m": mode}, res)


def gen_capital(rng: random.Random) -> Instance:
    country, cap = rng.choice(sorted(CAPITALS.items()))
    wrong = rng.choice(sorted(set(CAPITALS.values()) - {cap}))
    fmt = _pick(
        rng,
        "The capital of {c} is {x}.|{x} is the capital of {c}.|Sure! It is {x}.",
        c=country,
        x=cap,
    )
    wrong = _pick(rng, "{x}|The capital of {c} is {x}.|I believe it is {x}.", c=country, x=wrong)
    p = {"country": country, "capital": cap}
    return _styled(rng, "capital", p, {"c": country}, [cap, fmt, wrong])


def gen_list(rng: random.Random) -> Instance:
    cat, n = rng.choice(sorted(CATEGORIES)), rng.randint(2, 5)
    items = rng.sample(CATEGORIES[cat], n + 1)
    extra, items = items[-1], items[:-1]
    count = rng.choice([str(n), ONES[n]])
    fmt = rng.choice(
        [
            ", ".join(items),
            f"Here are {count} {cat}: {', '.join(items[:-1])} and {items[-1]}.",
            "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items)),
        ]
    )
    other = rng.choice([w for w in ALL_ITEMS if w not in CATEGORIES[cat]])
    wrong = rng.choice([items[:-1], items[:-1] + [other], items + [extra]])
    p = {"category": cat, "n": n, "items": items}
    res = [answer("list", p), fmt, "\n".join(f"- {w}" for w in wrong)]
    return _styled(rng, "list", p, {"n": count, "c": cat}, res)


def gen_reverse(rng: random.Random) -> Instance:
    words = rng.sample(ALL_ITEMS, rng.randint(3, 5))
    rev = words[::-1]
    fmt = rng.choice(
        [
            " ".join(rev),
            f"The reversed list is {', '.join(rev[:-1])} and {rev[-1]}.",
            f"Sure! Here it is: {', '.join(rev)}",
        ]
    )
    wrong = ", ".join(rng.choice([words, [rev[1], rev[0], *rev[2:]]]))
    wrong = _pick(rng, "{x}|The reversed list is {x}.", x=wrong)
    return _styled(
        rng, "reverse", {"words": words}, {"l": ", ".join(words)}, [", ".join(rev), fmt, wrong]
    )


def gen_backwards(rng: random.Random) -> Instance:
    word = rng.choice([w for w in ALL_ITEMS + EXTRA_WORDS if len(w) >= 4])
    rev = word[::-1]
    i = rng.choice([j for j in range(len(rev) - 1) if rev[j] != rev[j + 1]])
    swapped = rev[:i] + rev[i + 1] + rev[i] + rev[i + 2 :]
    fmt = _pick(rng, "'{w}' backwards is {r}.|Sure! {r}|The reversed word is {r}.", w=word, r=rev)
    wrong = _pick(rng, "{x}|Backwards it is {x}.", x=rng.choice([swapped, word]))
    return _styled(rng, "backwards", {"word": word, "rev": rev}, {"w": word}, [rev, fmt, wrong])


def gen_number_words(rng: random.Random) -> Instance:
    n = rng.randint(21, 998)
    x = num_words(n)
    fmt = _pick(
        rng, "{n} is written as {x}.|In words, it is {x}.|Sure! {n} in words is {x}.", n=n, x=x
    )
    flipped = int(str(n)[::-1]) if n % 10 and n < 100 else n
    wrong_n = rng.choice([n - 1, n + 1] + ([flipped] if flipped != n else []))
    wrong = _pick(rng, "{x}|{n} is written as {x}.", n=n, x=num_words(wrong_n))
    return _styled(rng, "number_words", {"n": n}, {"n": n}, [x, fmt, wrong])


GENERATORS: dict[str, Callable[[random.Random], Instance]] = {
    name.removeprefix("gen_"): fn for name, fn in list(globals().items()) if name.startswith("gen_")
}


# ---------------------------------------------------------------- assembly + CLI
def make_row(rng: random.Random, family: str, seen: set[str]) -> dict[str, Any]:
    while True:
        prompt, params, responses = GENERATORS[family](rng)
        if prompt not in seen:
            break
    seen.add(prompt)
    responses.append(rng.choice(OFF_TOPIC))
    scores = [verify(family, params, r) for r in responses]
    assert scores[0] > scores[1] > scores[2] > scores[3], (family, responses, scores)
    assert len(set(responses)) == len(responses), responses
    assert all(len(r.split()) <= 30 for r in responses) and len(prompt.split()) <= 25, prompt
    order = list(range(len(responses)))
    rng.shuffle(order)
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "responses": [responses[i] for i in order],
        "scores": [scores[i] for i in order],
        "family": family,
    }


def make_split(rng: random.Random, name: str, n: int, seen: set[str]) -> list[dict[str, Any]]:
    fams = list(GENERATORS)
    rows = [make_row(rng, fams[i % len(fams)], seen) for i in range(n)]
    rng.shuffle(rows)
    return [{"id": f"{name}-{i:06d}", **row} for i, row in enumerate(rows)]


def generate(seed: int = 0, n_train: int = 400, n_eval: int = 64) -> dict[str, list[dict]]:
    rng, seen = random.Random(seed), set[str]()
    train = make_split(rng, "train", n_train, seen)
    return {"train": train, "eval": make_split(rng, "eval", n_eval, seen)}


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, default=Path("prefopt/assets"))
    args = ap.parse_args(argv)
    splits = generate(args.seed, args.n_train, args.n_eval)
    for name, rows in splits.items():
        write_jsonl(rows, args.out_dir / f"default_{name}.jsonl")
        fams = Counter(r["family"] for r in rows)
        print(f"{name}: {len(rows)} rows -> {args.out_dir / f'default_{name}.jsonl'}")
        print("  families: " + ", ".join(f"{k}={v}" for k, v in sorted(fams.items())))
        hist = Counter(int(s) for r in rows for s in r["scores"])
        print(
            "  score histogram (floor): " + ", ".join(f"{k}:{v}" for k, v in sorted(hist.items()))
        )
    return splits


if __name__ == "__main__":
    main()
