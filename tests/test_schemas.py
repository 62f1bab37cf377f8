# Run: .venv/bin/pytest tests/test_schemas.py -q
"""Tests for prefopt.data.schemas: one valid row per schema, every class of malformed row."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

import prefopt.eval.constraints.schema  # noqa: F401  (registers constraints_reference)
from prefopt.data.example import DataError, Example
from prefopt.data.schemas import SCHEMAS, ParseOptions, parse_row, register_schema
from prefopt.errors import ConfigError

WHERE = "data/train.jsonl row 17"
LOC = r"^data/train\.jsonl row 17: "
OPTS = ParseOptions()


def canonical_row() -> dict[str, Any]:
    return {
        "prompt": "What is the capital of France?",
        "responses": ["Paris.", "Lyon.", "The capital of France is Paris."],
        "scores": [0.9, 0.1, 1],
        "id": "q-0001",
    }


def completion(model: str, response: str, overall: float, fine: float, ratings: list[str]):
    aspects = ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    return {
        "model": model,
        "principle": "helpfulness",
        "custom_system_prompt": "Be a helpful assistant.",
        "response": response,
        "overall_score": overall,
        "fine-grained_score": fine,
        "critique": "Clear and correct.",
        "annotations": {
            a: {"Rating": r, "Rationale": f"{a} rationale"}
            for a, r in zip(aspects, ratings, strict=True)
        },
    }


def ultrafeedback_row() -> dict[str, Any]:
    return {
        "source": "evol_instruct",
        "instruction": "Name three primary colors.",
        "models": ["gpt-4", "alpaca-7b"],
        "completions": [
            completion("gpt-4", "Red, yellow and blue.", 8.5, 4.75, ["5", "5", "4", "5"]),
            completion("alpaca-7b", "Green.", 3.0, 1.5, ["2", "1", "2", "1"]),
        ],
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
    }


def binarized_row() -> dict[str, Any]:
    prompt = "Write a haiku about autumn."
    return {
        "prompt": prompt,
        "prompt_id": "a1b2c3",
        "chosen": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": "Red leaves drift and fall"},
        ],
        "rejected": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": "Autumn is a season."},
        ],
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": "Red leaves drift and fall"},
        ],
        "score_chosen": 8.0,
        "score_rejected": 4.5,
    }


def armorm_row() -> dict[str, Any]:
    return {
        "prompt_id": "f00d",
        "prompt": "Explain recursion in one sentence.",
        "all_generated_responses": ["A function calling itself.", "Recursion is recursion."],
        "all_rm_scores": [0.1123, -0.034],
        "chosen": [],
        "rejected": [],
    }


ROWS = {
    "canonical": canonical_row,
    "ultrafeedback": ultrafeedback_row,
    "ultrafeedback_binarized": binarized_row,
    "armorm": armorm_row,
}


# --- valid rows ---------------------------------------------------------------------------------


def test_registry_has_all_schemas() -> None:
    assert set(ROWS) <= set(SCHEMAS)


def test_canonical_valid() -> None:
    ex = parse_row("canonical", canonical_row(), WHERE, OPTS)
    assert ex == Example(
        prompt=[{"role": "user", "content": "What is the capital of France?"}],
        responses=["Paris.", "Lyon.", "The capital of France is Paris."],
        scores=[0.9, 0.1, 1.0],
        id="q-0001",
    )
    assert all(type(s) is float for s in ex.scores)


def test_canonical_message_prompt_and_default_id() -> None:
    row = canonical_row()
    del row["id"]
    row["prompt"] = [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "Capital of France?"},
    ]
    ex = parse_row("canonical", row, WHERE, OPTS)
    assert ex.prompt == row["prompt"]
    assert ex.id == ""


def test_ultrafeedback_valid() -> None:
    row = ultrafeedback_row()
    row["id"] = "uf-42"
    ex = parse_row("ultrafeedback", row, WHERE, OPTS)
    assert ex == Example(
        prompt=[{"role": "user", "content": "Name three primary colors."}],
        responses=["Red, yellow and blue.", "Green."],
        scores=[4.75, 1.5],
        id="uf-42",
    )


@pytest.mark.parametrize(
    ("score_field", "expected"),
    [
        ("overall_score", [8.5, 3.0]),
        ("fine-grained_score", [4.75, 1.5]),
        ("helpfulness", [5.0, 2.0]),
        ("honesty", [5.0, 1.0]),
        ("instruction_following", [4.0, 2.0]),
        ("truthfulness", [5.0, 1.0]),
        ("mean_aspects", [4.75, 1.5]),
    ],
)
def test_ultrafeedback_score_fields(score_field: str, expected: list[float]) -> None:
    ex = parse_row("ultrafeedback", ultrafeedback_row(), WHERE, ParseOptions(score_field))
    assert ex.scores == expected
    assert ex.id == ""


def test_binarized_valid() -> None:
    ex = parse_row("ultrafeedback_binarized", binarized_row(), WHERE, OPTS)
    assert ex == Example(
        prompt=[{"role": "user", "content": "Write a haiku about autumn."}],
        responses=["Red leaves drift and fall", "Autumn is a season."],
        scores=[8.0, 4.5],
        id="a1b2c3",
    )


def test_binarized_without_scores_uses_one_zero() -> None:
    row = binarized_row()
    del row["score_chosen"], row["score_rejected"]
    assert parse_row("ultrafeedback_binarized", row, WHERE, OPTS).scores == [1.0, 0.0]


def test_binarized_assistant_only_uses_prompt_field() -> None:
    row = binarized_row()
    row["chosen"], row["rejected"] = row["chosen"][1:], row["rejected"][1:]
    ex = parse_row("ultrafeedback_binarized", row, WHERE, OPTS)
    assert ex.prompt == [{"role": "user", "content": "Write a haiku about autumn."}]


def test_armorm_valid() -> None:
    ex = parse_row("armorm", armorm_row(), WHERE, OPTS)
    assert ex == Example(
        prompt=[{"role": "user", "content": "Explain recursion in one sentence."}],
        responses=["A function calling itself.", "Recursion is recursion."],
        scores=[0.1123, -0.034],
        id="f00d",
    )


def test_register_schema_decorator() -> None:
    @register_schema("_test_tmp")
    def parse_tmp(row: dict[str, Any], where: str, opts: ParseOptions) -> Example:
        return Example([{"role": "user", "content": "hi"}], ["a", "b"], [1.0, 0.0])

    try:
        assert SCHEMAS["_test_tmp"] is parse_tmp
        assert parse_row("_test_tmp", {}, WHERE, OPTS).responses == ["a", "b"]
        with pytest.raises(ValueError, match="registered twice"):
            register_schema("_test_tmp")(parse_tmp)
    finally:
        del SCHEMAS["_test_tmp"]


# --- malformed rows -----------------------------------------------------------------------------


def _raises(schema: str, row: dict[str, Any], match: str, opts: ParseOptions = OPTS) -> None:
    with pytest.raises(DataError, match=LOC + match):
        parse_row(schema, row, WHERE, opts)


def _with(schema: str, **changes: Any) -> dict[str, Any]:
    row = copy.deepcopy(ROWS[schema]())
    row.update(changes)
    return row


def _without(schema: str, key: str) -> dict[str, Any]:
    row = ROWS[schema]()
    del row[key]
    return row


@pytest.mark.parametrize(
    ("schema", "key"),
    [
        ("canonical", "prompt"),
        ("canonical", "responses"),
        ("canonical", "scores"),
        ("ultrafeedback", "instruction"),
        ("ultrafeedback", "completions"),
        ("ultrafeedback_binarized", "chosen"),
        ("ultrafeedback_binarized", "rejected"),
        ("ultrafeedback_binarized", "score_rejected"),
        ("armorm", "prompt"),
        ("armorm", "all_generated_responses"),
        ("armorm", "all_rm_scores"),
    ],
)
def test_missing_key(schema: str, key: str) -> None:
    _raises(schema, _without(schema, key), f"missing key '{key}'")


def test_missing_nested_keys() -> None:
    row = ultrafeedback_row()
    del row["completions"][1]["fine-grained_score"]
    _raises("ultrafeedback", row, r"missing key 'completions'\[1\]\['fine-grained_score'\]")
    row = ultrafeedback_row()
    del row["completions"][0]["response"]
    _raises("ultrafeedback", row, r"missing key 'completions'\[0\]\['response'\]")
    row = ultrafeedback_row()
    del row["completions"][1]["annotations"]["honesty"]
    _raises(
        "ultrafeedback",
        row,
        r"missing key 'completions'\[1\]\['annotations'\]\['honesty'\]",
        ParseOptions("mean_aspects"),
    )


def test_binarized_missing_prompt_when_needed() -> None:
    row = binarized_row()
    row["chosen"], row["rejected"] = row["chosen"][1:], row["rejected"][1:]
    del row["prompt"]
    _raises("ultrafeedback_binarized", row, "missing key 'prompt'")


@pytest.mark.parametrize(
    ("schema", "changes", "match"),
    [
        ("canonical", {"scores": "0.9"}, "key 'scores': expected a list of numbers, got str"),
        ("canonical", {"responses": "Paris."}, "key 'responses': expected a list of str.*got str"),
        ("canonical", {"prompt": 42}, "key 'prompt': expected a string or a list.*got int"),
        ("canonical", {"id": 7}, "key 'id': expected a string, got int"),
        ("canonical", {"prompt": ["hi"]}, r"key 'prompt'\[0\]: expected a message dict, got str"),
        (
            "canonical",
            {"prompt": [{"role": "user", "content": None}]},
            r"key 'prompt'\[0\]\['content'\]: expected a string, got NoneType",
        ),
        (
            "canonical",
            {"responses": ["a", 3, "c"]},
            r"key 'responses'\[1\]: expected a string, got int",
        ),
        ("canonical", {"scores": [1, "2", 3]}, r"key 'scores'\[1\]: expected a number, got str"),
        ("armorm", {"all_rm_scores": None}, "key 'all_rm_scores': expected a list.*got NoneType"),
        ("ultrafeedback", {"completions": {}}, "key 'completions': expected a list, got dict"),
        ("ultrafeedback", {"id": 3}, "key 'id': expected a string, got int"),
        (
            "ultrafeedback_binarized",
            {"chosen": "x"},
            "key 'chosen': expected a list of messages, got str",
        ),
        ("ultrafeedback_binarized", {"score_chosen": "8"}, "key 'score_chosen': expected a num"),
        ("ultrafeedback_binarized", {"prompt_id": 1}, "key 'prompt_id': expected a string, got"),
    ],
)
def test_wrong_type(schema: str, changes: dict[str, Any], match: str) -> None:
    _raises(schema, _with(schema, **changes), match)


def test_ultrafeedback_wrong_nested_types() -> None:
    row = ultrafeedback_row()
    row["completions"][0]["overall_score"] = "8.5"
    _raises(
        "ultrafeedback",
        row,
        r"key 'completions'\[0\]\['overall_score'\]: expected a number, got str",
        ParseOptions("overall_score"),
    )
    row = ultrafeedback_row()
    row["completions"][1] = "Green."
    _raises("ultrafeedback", row, r"key 'completions'\[1\]: expected a dict, got str")


def test_row_not_a_dict() -> None:
    with pytest.raises(DataError, match=LOC + "expected a JSON object, got list"):
        parse_row("canonical", [], WHERE, OPTS)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("schema", "changes", "match"),
    [
        ("canonical", {"responses": ["Paris."], "scores": [1.0]}, "key 'responses': K=1"),
        ("canonical", {"responses": [], "scores": []}, "key 'responses': K=0"),
        (
            "armorm",
            {"all_generated_responses": ["x"], "all_rm_scores": [0.5]},
            "key 'all_generated_responses': K=1",
        ),
    ],
)
def test_too_few_responses(schema: str, changes: dict[str, Any], match: str) -> None:
    _raises(schema, _with(schema, **changes), match + ", at least 2 responses are required")


def test_ultrafeedback_single_completion() -> None:
    row = ultrafeedback_row()
    row["completions"] = row["completions"][:1]
    _raises("ultrafeedback", row, "key 'completions': K=1, at least 2 responses are required")


@pytest.mark.parametrize(
    ("value", "shown"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
)
def test_non_finite_score(value: float, shown: str) -> None:
    row = _with("canonical", scores=[0.9, 0.1, value])
    _raises("canonical", row, rf"key 'scores'\[2\]: score is {shown}")
    row = _with("armorm", all_rm_scores=[value, 0.1])
    _raises("armorm", row, rf"key 'all_rm_scores'\[0\]: score is {shown}")
    row = _with("ultrafeedback_binarized", score_rejected=value)
    _raises("ultrafeedback_binarized", row, f"key 'score_rejected': score is {shown}")
    row = ultrafeedback_row()
    row["completions"][1]["overall_score"] = value
    _raises(
        "ultrafeedback",
        row,
        rf"key 'completions'\[1\]\['overall_score'\]: score is {shown}",
        ParseOptions("overall_score"),
    )


def test_nan_string_rating_is_not_finite() -> None:
    row = ultrafeedback_row()
    row["completions"][0]["annotations"]["truthfulness"]["Rating"] = "nan"
    _raises(
        "ultrafeedback",
        row,
        r"key 'completions'\[0\]\['annotations'\]\['truthfulness'\]\['Rating'\]: score is nan",
        ParseOptions("truthfulness"),
    )


def test_bool_score() -> None:
    _raises(
        "canonical",
        _with("canonical", scores=[True, 0.1, 0.5]),
        r"key 'scores'\[0\]: expected a number, got bool",
    )
    _raises(
        "ultrafeedback_binarized",
        _with("ultrafeedback_binarized", score_chosen=True),
        "key 'score_chosen': expected a number, got bool",
    )


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_response(text: str) -> None:
    row = _with("canonical", responses=["Paris.", text, "Paris!"])
    _raises("canonical", row, r"key 'responses'\[1\]: response is empty")
    row = _with("armorm", all_generated_responses=["ok", text])
    _raises("armorm", row, r"key 'all_generated_responses'\[1\]: response is empty")
    row = ultrafeedback_row()
    row["completions"][0]["response"] = text
    _raises("ultrafeedback", row, r"key 'completions'\[0\]\['response'\]: response is empty")
    row = binarized_row()
    row["rejected"][-1]["content"] = text
    _raises("ultrafeedback_binarized", row, r"key 'rejected'\[-1\]: response is empty")


def test_mismatched_lengths() -> None:
    _raises(
        "canonical",
        _with("canonical", scores=[0.9, 0.1]),
        "key 'scores': 2 scores for 3 responses",
    )
    _raises(
        "armorm",
        _with("armorm", all_rm_scores=[0.1, 0.2, 0.3]),
        "key 'all_rm_scores': 3 scores for 2 responses",
    )


@pytest.mark.parametrize("prompt", ["", "  \n ", [{"role": "user", "content": " "}]])
def test_empty_prompt(prompt: Any) -> None:
    _raises("canonical", _with("canonical", prompt=prompt), "key 'prompt': prompt text is empty")
    _raises("armorm", _with("armorm", prompt=prompt), "key 'prompt': prompt text is empty")


def test_empty_prompt_other_schemas() -> None:
    _raises(
        "ultrafeedback",
        _with("ultrafeedback", instruction=" "),
        "key 'instruction': prompt text is empty",
    )
    _raises("canonical", _with("canonical", prompt=[]), "key 'prompt': message list is empty")
    row = binarized_row()
    row["chosen"], row["rejected"] = row["chosen"][1:], row["rejected"][1:]
    row["prompt"] = ""
    _raises("ultrafeedback_binarized", row, "key 'prompt': prompt text is empty")


def test_bad_role() -> None:
    prompt = [{"role": "human", "content": "Hi"}, {"role": "user", "content": "Capital?"}]
    _raises(
        "canonical",
        _with("canonical", prompt=prompt),
        r"key 'prompt'\[0\]\['role'\]: 'human' is not one of",
    )
    row = binarized_row()
    row["chosen"][1]["role"] = "gpt"
    _raises("ultrafeedback_binarized", row, r"key 'chosen'\[1\]\['role'\]: 'gpt' is not one of")


def test_last_message_not_user() -> None:
    prompt = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    _raises(
        "canonical",
        _with("canonical", prompt=prompt),
        r"key 'prompt'\[-1\]: last message has role 'assistant', expected 'user'",
    )


def test_binarized_last_message_not_assistant() -> None:
    row = binarized_row()
    row["rejected"] = row["rejected"][:1]
    _raises(
        "ultrafeedback_binarized",
        row,
        r"key 'rejected'\[-1\]: last message has role 'user', expected 'assistant'",
    )


def test_binarized_prompt_mismatch() -> None:
    row = binarized_row()
    row["rejected"][0]["content"] = "Write a limerick about autumn."
    _raises(
        "ultrafeedback_binarized", row, "key 'rejected': conversation prefix differs from 'chosen'"
    )


@pytest.mark.parametrize("rating", ["N/A", "four", ""])
def test_ultrafeedback_non_numeric_rating(rating: str) -> None:
    row = ultrafeedback_row()
    row["completions"][1]["annotations"]["honesty"]["Rating"] = rating
    match = rf"key 'completions'\[1\]\['annotations'\]\['honesty'\]\['Rating'\]: rating '{rating}'"
    for field in ("honesty", "mean_aspects"):
        _raises("ultrafeedback", row, match + " is not a number", ParseOptions(field))
    # Other score fields never look at the rating.
    assert parse_row("ultrafeedback", row, WHERE, ParseOptions("overall_score")).scores == [8.5, 3]


def test_unknown_score_field() -> None:
    with pytest.raises(ValueError, match=r"score_field='overall'.*'fine-grained_score'.*mean_"):
        ParseOptions("overall")


def test_unknown_schema() -> None:
    with pytest.raises(ConfigError, match=r"unknown schema 'ultra_feedback'.*'armorm', 'canon"):
        parse_row("ultra_feedback", ultrafeedback_row(), WHERE, OPTS)


# --- the embedded default's schema: benchmark rows plus the reference answer --------------------


def constraints_row() -> dict[str, Any]:
    return {
        "id": "heldout-000000",
        "prompt": "What is 31 + 26? Answer in a complete sentence.",
        "responses": ["31 + 26 is 58.", "I like numbers."],
        "scores": [3.0, 0.5],
        "family": "arithmetic",
        "params": {"a": 31, "b": 26, "op": "+", "ans": 57, "style": "sentence"},
    }


def test_constraints_reference_appends_the_verified_reference_answer() -> None:
    ex = parse_row("constraints_reference", constraints_row(), WHERE, OPTS)
    assert ex.responses == ["31 + 26 is 58.", "I like numbers.", "The answer is 57."]
    assert ex.scores == [3.0, 0.5, 10.0]  # the verifier's pass score for the reference
    assert ex.id == "heldout-000000"
    assert ex.prompt == [{"role": "user", "content": constraints_row()["prompt"]}]


def test_constraints_reference_names_a_row_that_is_not_a_benchmark_task() -> None:
    row = constraints_row()
    del row["family"]
    with pytest.raises(DataError, match=rf"^{WHERE}: missing key 'family' .*constraints_reference"):
        parse_row("constraints_reference", row, WHERE, OPTS)
    row = constraints_row() | {"family": "poetry"}
    with pytest.raises(DataError, match="unknown family 'poetry'"):
        parse_row("constraints_reference", row, WHERE, OPTS)
