"""prefopt.eval.constraints: graded verifiers per family, deterministic disjoint splits, JSONL rows.

.venv/bin/pytest -q tests/test_constraints.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from prefopt.eval.constraints import (
    FAMILIES,
    SPLITS,
    Task,
    Verdict,
    ideal_response,
    make_tasks,
    satisfaction,
    split_of,
    task_from_row,
    task_row,
    verify,
)
from prefopt.eval.constraints.__main__ import main

OCEAN = {"topic": "the ocean", "key": "ocean"}
FRUITS = {"category": "fruits", "n": 3, "items": ["apple", "pear", "plum"]}

# family -> (params, responses from best to worst). The first passes with 10.0; every later one
# fails and scores strictly below the one before it, so partial credit sits between pass and fail.
LADDERS: dict[str, tuple[dict, list[str]]] = {
    "arithmetic": (
        {"a": 17, "b": 25, "op": "+", "ans": 42},
        ["42", "The answer is 42.", "41", "I'm not sure.", "Pass."],
    ),
    "larger": (
        {"a": 17, "b": 250, "ans": 250},
        ["250", "The larger number is 250.", "17", "Sorry, no idea.", "Maybe."],
    ),
    "case": (
        {"word": "apple", "mode": "upper", "target": "APPLE"},
        ["APPLE", "Sure! APPLE", "APPle", "Sorry, I can't.", "Hello!"],
    ),
    "capital": (
        {"country": "France", "capital": "Paris"},
        ["Paris", "The capital of France is Paris.", "The capital of France is Berlin.", "Berlin"]
        + ["Sorry.", "Nope"],
    ),
    "list": (
        FRUITS,
        [
            "- apple\n- pear\n- plum",
            "1. Apple\n2. Pear\n3. Plum",
            "Here are 3:\n- apple\n- pear\n- plum",
        ]
        + ["- apple\n- pear", "- apple\n- dog\n- pear", "I'm not sure.", "Pass."],
    ),
    "reverse": (
        {"words": ["cat", "dog", "fox"]},
        ["fox, dog, cat", "The reversed list is fox, dog and cat.", "fox, cat, dog", "Sorry."]
        + ["Who knows?"],
    ),
    "backwards": (
        {"word": "lemon", "rev": "nomel"},
        ["nomel", "Lemon backwards is nomel.", "nomle", "lemon", "I don't know.", "Maybe."],
    ),
    "number_words": (
        {"n": 42},
        ["forty-two", "42 is written as forty-two.", "forty-three", "fifty-two", "No idea."]
        + ["Pass."],
    ),
    "word_count": (
        {**OCEAN, "n": 5},
        [
            "The ocean is vast, blue.",
            "The ocean is vast and blue.",  # one word over
            "The ocean is a huge body of salt water covering most of Earth.",
            "Hello! How can I help you today?",  # off-topic, two words over
            "Sorry, I cannot help you here.",  # five words, still a refusal
        ],
    ),
    "keywords": (
        {"topic": "coffee", "key": "coffee", "words": ["lantern", "morning"]},
        [
            "Coffee by the lantern is my favourite morning ritual.",
            "Coffee by the lantern is my favourite morning ritual. I love it.",
            "Coffee is great.",
            "Coffee is great. Really.",
            "I like dogs.",
            "Sorry, I can't.",
        ],
    ),
    "lowercase": (
        {"topic": "rain", "key": "rain"},
        [
            "rain makes the garden grow.",
            "Rain makes the garden grow.",
            "rain falls",
            "RAIN MAKES THE GARDEN GROW.",
            "Hello There Friend",
            "sorry, i can't help.",
        ],
    ),
    "ending": (
        {"topic": "owls", "key": "owl", "phrase": "That is all."},
        [
            "Owls can rotate their heads 270 degrees. That is all.",
            "Owls can rotate their heads 270 degrees. That is all",
            "Owls can rotate their heads. That is all. Bye!",
            "Owls can rotate their heads 270 degrees.",
            "I like pizza.",
            "Sorry, I don't know.",
        ],
    ),
    "lowercase_keyword": (
        {"topic": "snow", "key": "snow", "words": ["whistle"]},
        [
            "the snow fell as the wind began to whistle.",
            "The snow fell as the wind began to whistle.",
            "the snow fell softly.",
            "The snow fell softly.",
            "hello",
            "Sorry, I can't.",
        ],
    ),
}


def test_every_family_has_a_ladder() -> None:
    assert sorted(LADDERS) == sorted(FAMILIES)


@pytest.mark.parametrize("family", sorted(LADDERS))
def test_graded_ladder(family: str) -> None:
    params, responses = LADDERS[family]
    verdicts = [verify({"family": family, "params": params}, r) for r in responses]
    assert verdicts[0] == Verdict(10.0, True), responses[0]
    for r, v in zip(responses[1:], verdicts[1:], strict=True):
        assert not v.passed and v.score < 10.0, (r, v)
    scores = [v.score for v in verdicts]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores), scores
    for empty in ("", "  \n ", None):
        assert verify({"family": family, "params": params}, empty) == Verdict(0.0, False)
    assert scores[-1] > 0.0


@pytest.mark.parametrize(
    ("family", "params", "response"),
    [
        ("list", FRUITS, "* Apples\n* Bananas\n* Cherries"),  # any fruits; plurals, * bullets
        ("word_count", {**OCEAN, "n": 5}, "Vast - blue - deep - salty - mysterious."),
        ("ending", {**OCEAN, "phrase": "That is all."}, "The ocean is salty. THAT IS ALL."),
        ("keywords", {**OCEAN, "words": ["lantern", "morning"]}, "Lanterns dim as morning comes."),
        ("lowercase", OCEAN, "hello there friend"),  # the topic is not a constraint
    ],
)
def test_lenient_passes(family: str, params: dict, response: str) -> None:
    assert verify({"family": family, "params": params}, response) == Verdict(10.0, True)


def test_hand_computed_scores() -> None:
    def score(family: str, params: dict, response: str) -> float:
        return verify({"family": family, "params": params}, response).score

    # word_count: on topic, one word off -> 3 + 6 * 0.75
    assert score("word_count", {**OCEAN, "n": 5}, "The ocean is vast and blue.") == 7.5
    # lowercase: 3+ words (credit 1), 1 capital among 23 letters -> 3 + 6 * (1 + 22/23) / 2
    assert score("lowercase", OCEAN, "Oceans make the garden grow.") == 8.87
    # keywords, off topic: one of two words, one sentence -> 0.5 + 2.4 * 2/3
    assert score("keywords", {**OCEAN, "words": ["lantern", "x"]}, "A lantern glows.") == 2.1
    # answer family: right number plus two extra words -> 6 - 0.1 * 2
    assert score("arithmetic", {"a": 7, "b": 6, "op": "*", "ans": 42}, "It is 42") == 5.8


def test_sentence_style_flips_exact_and_format() -> None:
    params = {"a": 7, "b": 6, "op": "*", "ans": 42, "style": "sentence"}
    assert verify({"family": "arithmetic", "params": params}, "Seven times six is 42.").passed
    bare = verify({"family": "arithmetic", "params": params}, "42")
    assert not bare.passed and 5.0 <= bare.score < 10.0


@pytest.mark.parametrize("split", SPLITS)
def test_ideal_passes_and_refusal_scores_low(split: str) -> None:
    tasks = make_tasks(split, 50 * len(FAMILIES), seed=3)
    assert Counter(t.family for t in tasks) == dict.fromkeys(FAMILIES, 50)
    for t in tasks:
        assert verify(t, ideal_response(t)) == Verdict(10.0, True), (t, ideal_response(t))
        refusal = verify(t, "Sorry, I can't help with that.")
        assert not refusal.passed and refusal.score <= 1.0, (t, refusal)


def test_make_tasks_is_deterministic_and_prefix_stable() -> None:
    a = make_tasks("train", 100, seed=0)
    assert a == make_tasks("train", 100, seed=0)
    assert a != make_tasks("train", 100, seed=1)
    assert make_tasks("train", 40, seed=0) == a[:40]
    assert [t.id for t in a[:3]] == ["train-000000", "train-000001", "train-000002"]
    # a family's tasks do not depend on which other families were asked for
    only = make_tasks("train", 10, seed=0, families=["lowercase"])
    assert [t.prompt for t in only] == [
        t.prompt for t in make_tasks("train", 130) if t.family == "lowercase"
    ][:10]
    assert make_tasks("heldout", 5, families="ending") == make_tasks(
        "heldout", 5, families=["ending"]
    )


def test_split_hash_is_pinned() -> None:
    # a changed hash or generator would silently move prompts between train and heldout
    assert 0.18 < sum(split_of(f"p{i}") == "heldout" for i in range(5000)) / 5000 < 0.22
    got = [t.prompt for t in make_tasks("heldout", 13, seed=0)[::6]]
    assert got == [
        "What is 31 + 26? Answer in a complete sentence.",
        "Write 'dragon' with its letters in reverse order. Reply with only that.",
        "Using only lowercase letters, write one sentence about umbrellas that includes 'feather'.",
    ]


@pytest.mark.parametrize("seed", [0, 7])
def test_splits_are_disjoint_unique_and_balanced(seed: int) -> None:
    train = make_tasks("train", 500, seed=seed)
    heldout = make_tasks("heldout", 500, seed=seed)
    other = make_tasks("heldout", 100, seed=seed + 1)
    for split, tasks in (("train", train), ("heldout", heldout)):
        assert len({t.prompt for t in tasks}) == len(tasks)
        assert all(split_of(t.prompt) == split for t in tasks)
        counts = Counter(t.family for t in tasks)
        assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
    train_prompts = {t.prompt for t in train}
    assert not train_prompts & {t.prompt for t in heldout + other}


def test_make_tasks_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'eval'.*heldout"):
        make_tasks("eval", 4)
    with pytest.raises(ValueError, match=r"'foo'.*word_count"):
        make_tasks("train", 4, families=["lowercase", "foo"])
    with pytest.raises(ValueError, match=r"'capital' ran out of distinct heldout prompts"):
        make_tasks("heldout", 200, families=["capital"])


def test_row_round_trip() -> None:
    tasks = make_tasks("heldout", 2 * len(FAMILIES), seed=1)
    for t in tasks:
        row = json.loads(json.dumps(task_row(t)))
        assert row["prompt"] == [{"role": "user", "content": t.prompt}]
        assert task_from_row(row, "x") == t
    t = tasks[0]
    plain = task_from_row({"family": t.family, "params": t.params, "prompt": t.prompt})
    assert plain == Task("", t.family, t.prompt, t.params)
    assert verify(task_row(t), ideal_response(t)) == verify(t, ideal_response(t))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "hi", "params": {}}, "missing key 'family'"),
        ({"prompt": "hi", "family": "foo", "params": {}}, "key 'family': unknown family 'foo'"),
        ({"prompt": "hi", "family": "lowercase"}, "missing key 'params'"),
        (
            {"prompt": "hi", "family": "lowercase", "params": [1]},
            "key 'params': expected an object",
        ),
        ({"prompt": "hi", "family": "word_count", "params": OCEAN}, "key 'params'.*'n'"),
        ({"family": "lowercase", "params": OCEAN}, "missing key 'prompt'"),
        ({"prompt": 5, "family": "lowercase", "params": OCEAN}, "key 'prompt'"),
        ({"prompt": "hi", "family": "lowercase", "params": OCEAN, "id": 3}, "key 'id'"),
        ([1, 2], "expected a task or an object, got list"),
    ],
)
def test_malformed_row_names_where_and_key(row: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^tasks\.jsonl line 3: {message}"):
        task_from_row(row, "tasks.jsonl line 3")  # type: ignore[arg-type]


def test_satisfaction_on_a_mini_set() -> None:
    paris = Task("a", "capital", "Capital of France?", {"country": "France", "capital": "Paris"})
    tokyo = {"family": "capital", "params": {"country": "Japan", "capital": "Tokyo"}}
    rain = Task("c", "lowercase", "Rain, lowercase.", {"topic": "rain", "key": "rain"})
    got = satisfaction([paris, tokyo, rain], ["Paris", "Kyoto", "rain makes the garden grow."])
    # Kyoto is no capital in the list, so it scores as off-topic (0.5)
    assert got == pytest.approx(
        {
            "satisfaction": 2 / 3,
            "score": (10 + 0.5 + 10) / 3,
            "satisfaction/capital": 0.5,
            "satisfaction/lowercase": 1.0,
            "n": 3,
        }
    )
    assert satisfaction([], []) == {"satisfaction": 0.0, "score": 0.0, "n": 0}
    with pytest.raises(ValueError, match="2 tasks but 1 responses"):
        satisfaction([paris, rain], ["Paris"])


def test_cli_writes_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tasks.jsonl"
    main(["--split", "heldout", "--n", "28", "--seed", "2", "--out", str(out)])
    lines = out.read_text(encoding="utf-8").splitlines()
    rows = [task_from_row(json.loads(line), f"line {i}") for i, line in enumerate(lines, 1)]
    assert rows == make_tasks("heldout", 28, seed=2)
    assert "lowercase=2" in capsys.readouterr().out


def test_module_is_stdlib_only() -> None:
    code = "import sys, prefopt.eval.constraints.__main__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_m_writes_rows_to_stdout() -> None:
    # The package's __main__ runs as a module; the count line goes to stderr, so stdout is JSONL.
    cmd = [sys.executable, "-m", "prefopt.eval.constraints", "--split", "train", "--n", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [task_from_row(json.loads(line)) for line in proc.stdout.splitlines()]
    assert rows == make_tasks("train", 3)
    assert [r.family for r in rows] == ["arithmetic", "larger", "case"]
    assert proc.stderr.startswith("3 train tasks -> stdout")
