"""Row schemas: parse one raw dataset row into an :class:`Example`.

Each schema is a small registered parser; the validation they share lives in :func:`_example`.
Error messages start with the caller's ``where`` and name the offending key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefopt.config import Aspect, ScoreField, check_choice, options
from prefopt.data.example import DataError, Example, Message
from prefopt.errors import ConfigError

# Scores become float32 tensors in every batch (prefopt/data/collate.py): a score beyond this is
# finite here but inf in training, so it is refused at load time rather than skipping a step.
FLOAT32_MAX = 3.4028234663852886e38
ROLES = ("system", "user", "assistant")
ASPECTS = options(Aspect)


@dataclass(frozen=True)
class ParseOptions:
    """Options for :func:`parse_row`.

    Attributes:
        score_field: Which UltraFeedback score becomes ``Example.scores`` (``ultrafeedback`` schema
            only). One of ``"overall_score"`` or ``"fine-grained_score"`` (the completion's numeric
            fields), an aspect rating ``"helpfulness"``, ``"honesty"``, ``"instruction_following"``
            or ``"truthfulness"`` (``annotations[aspect]["Rating"]``), or ``"mean_aspects"`` (the
            mean of the four aspect ratings).
    """

    score_field: str = "fine-grained_score"

    def __post_init__(self) -> None:
        check_choice("dataset.score_field", self.score_field, ScoreField)


Parser = Callable[[dict[str, Any], str, ParseOptions], Example]
SCHEMAS: dict[str, Parser] = {}


def register_schema(name: str) -> Callable[[Parser], Parser]:
    """Return a decorator that registers a parser in :data:`SCHEMAS` under ``name``."""

    def decorate(fn: Parser) -> Parser:
        if name in SCHEMAS:
            raise ValueError(f"schema {name!r} is registered twice")
        SCHEMAS[name] = fn
        return fn

    return decorate


def parse_row(schema: str, row: dict[str, Any], where: str, opts: ParseOptions) -> Example:
    """Parse one raw row with the named schema.

    Args:
        schema: A key of :data:`SCHEMAS`.
        row: The raw row (one JSON object).
        where: Location prefix for error messages, e.g. ``"data/train.jsonl row 17"``.
        opts: Parsing options.

    Returns:
        The validated example, with scores as Python floats.

    Raises:
        ConfigError: ``schema`` is not registered.
        DataError: The row is malformed.
    """
    if schema not in SCHEMAS:
        known = sorted(SCHEMAS)
        raise ConfigError(f"dataset.schema: unknown schema {schema!r}; known schemas: {known}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return SCHEMAS[schema](row, where, opts)


def _get(obj: dict[str, Any], key: str, where: str, parent: str = "") -> Any:
    label = f"{parent}['{key}']" if parent else f"'{key}'"
    if key not in obj:
        raise DataError(f"{where}: missing key {label}")
    return obj[key]


def _typed(value: Any, typ: type, label: str, where: str, expected: str) -> Any:
    if not isinstance(value, typ):
        raise DataError(f"{where}: key {label}: expected {expected}, got {type(value).__name__}")
    return value


def _optional_str(row: dict[str, Any], key: str, where: str) -> str:
    return _typed(row.get(key, ""), str, f"'{key}'", where, "a string")


def _score(value: Any, label: str, where: str) -> float:
    # bool is an int subclass, but a True/False "score" is almost surely a mislabelled field.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: key {label}: expected a number, got {type(value).__name__}")
    try:
        score = float(value)
    except OverflowError:  # an integer with hundreds of digits
        digits = len(str(abs(value)))
        msg = f"{where}: key {label}: a {digits}-digit integer score overflows a float"
        raise DataError(msg) from None
    if not math.isfinite(score):
        raise DataError(f"{where}: key {label}: score is {value}")
    if abs(score) > FLOAT32_MAX:
        msg = f"{where}: key {label}: score {value:g} is inf in float32 (the training dtype)"
        raise DataError(msg, fix="rescale the scores")
    return score


def _messages(value: Any, key: str, where: str, last_role: str = "user") -> list[Message]:
    """Normalize a prompt (string or message list) and check roles, types and the last turn."""
    if last_role == "user" and isinstance(value, str):
        value = [{"role": "user", "content": value}]
    expected = "a string or a list of messages" if last_role == "user" else "a list of messages"
    _typed(value, list, f"'{key}'", where, expected)
    if not value:
        raise DataError(f"{where}: key '{key}': message list is empty")
    for i, msg in enumerate(value):
        label = f"'{key}'[{i}]"
        _typed(msg, dict, label, where, "a message dict")
        for field in ("role", "content"):
            _typed(_get(msg, field, where, label), str, f"{label}['{field}']", where, "a string")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: key {label}['role']: {msg['role']!r} is not one of {ROLES}")
    if value[-1]["role"] != last_role:
        raise DataError(
            f"{where}: key '{key}'[-1]: last message has role {value[-1]['role']!r}, "
            f"expected {last_role!r}"
        )
    if last_role == "user" and not value[-1]["content"].strip():
        raise DataError(f"{where}: key '{key}': prompt text is empty")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _example(
    where: str,
    prompt: Any,
    responses: Any,
    scores: Any,
    *,
    id: str = "",
    keys: tuple[str, str, str] = ("prompt", "responses", "scores"),
    labels: list[str] | None = None,
) -> Example:
    """Validate the pieces every schema produces and build the Example.

    ``keys`` names the row keys holding prompt, responses and scores; ``labels`` optionally names
    each response (default ``'responses'[i]``) when they do not come from one list.
    """
    prompt_key, resp_key, score_key = keys
    messages = _messages(prompt, prompt_key, where)
    _typed(responses, list, f"'{resp_key}'", where, "a list of strings")
    _typed(scores, list, f"'{score_key}'", where, "a list of numbers")
    if len(responses) != len(scores):
        raise DataError(
            f"{where}: key '{score_key}': {len(scores)} scores for {len(responses)} responses"
        )
    if len(responses) < 2:
        raise DataError(
            f"{where}: key '{resp_key}': K={len(responses)}, at least 2 responses are required"
        )
    labels = labels or [f"'{resp_key}'[{i}]" for i in range(len(responses))]
    for text, label in zip(responses, labels, strict=True):
        if not _typed(text, str, label, where, "a string").strip():
            raise DataError(f"{where}: key {label}: response is empty")
    floats = [_score(s, f"'{score_key}'[{i}]", where) for i, s in enumerate(scores)]
    return Example(prompt=messages, responses=list(responses), scores=floats, id=id)


@register_schema("canonical")
def parse_canonical(row: dict[str, Any], where: str, opts: ParseOptions) -> Example:
    """``{"prompt": str | messages, "responses": [str], "scores": [number], "id"?: str}``."""
    keys = ("prompt", "responses", "scores")
    pieces = [_get(row, k, where) for k in keys]
    return _example(where, *pieces, id=_optional_str(row, "id", where))


def _aspect_rating(completion: dict[str, Any], parent: str, aspect: str, where: str) -> float:
    annotations = _get(completion, "annotations", where, parent)
    label = f"{parent}['annotations']"
    _typed(annotations, dict, label, where, "a dict")
    aspect_dict, label = _get(annotations, aspect, where, label), f"{label}['{aspect}']"
    rating = _get(_typed(aspect_dict, dict, label, where, "a dict"), "Rating", where, label)
    label = f"{label}['Rating']"
    if isinstance(rating, str):
        try:
            rating = float(rating)
        except ValueError:
            raise DataError(f"{where}: key {label}: rating {rating!r} is not a number") from None
    return _score(rating, label, where)


@register_schema("ultrafeedback")
def parse_ultrafeedback(row: dict[str, Any], where: str, opts: ParseOptions) -> Example:
    """Raw ``openbmb/UltraFeedback``; ``opts.score_field`` picks the score (see ParseOptions)."""
    completions = _typed(_get(row, "completions", where), list, "'completions'", where, "a list")
    responses: list[Any] = []
    scores: list[float] = []
    labels: list[str] = []
    for i, completion in enumerate(completions):
        parent = f"'completions'[{i}]"
        _typed(completion, dict, parent, where, "a dict")
        responses.append(_get(completion, "response", where, parent))
        labels.append(f"{parent}['response']")
        if opts.score_field in ("overall_score", "fine-grained_score"):
            label = f"{parent}['{opts.score_field}']"
            scores.append(_score(_get(completion, opts.score_field, where, parent), label, where))
        else:
            aspects = ASPECTS if opts.score_field == "mean_aspects" else (opts.score_field,)
            ratings = [_aspect_rating(completion, parent, a, where) for a in aspects]
            scores.append(sum(ratings) / len(ratings))
    keys = ("instruction", "completions", "completions")
    prompt, row_id = _get(row, "instruction", where), _optional_str(row, "id", where)
    return _example(where, prompt, responses, scores, id=row_id, keys=keys, labels=labels)


@register_schema("ultrafeedback_binarized")
def parse_ultrafeedback_binarized(row: dict[str, Any], where: str, opts: ParseOptions) -> Example:
    """``HuggingFaceH4/ultrafeedback_binarized``: full chosen/rejected conversations."""
    chosen = _messages(_get(row, "chosen", where), "chosen", where, last_role="assistant")
    rejected = _messages(_get(row, "rejected", where), "rejected", where, last_role="assistant")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: key 'rejected': conversation prefix differs from 'chosen'")
    prompt, prompt_key = chosen[:-1], "chosen"
    if not prompt:
        prompt, prompt_key = _get(row, "prompt", where), "prompt"
    scores = [1.0, 0.0]  # pairwise preference without scores
    if "score_chosen" in row or "score_rejected" in row:
        score_keys = ("score_chosen", "score_rejected")
        scores = [_score(_get(row, k, where), f"'{k}'", where) for k in score_keys]
    responses = [chosen[-1]["content"], rejected[-1]["content"]]
    row_id, labels = _optional_str(row, "prompt_id", where), ["'chosen'[-1]", "'rejected'[-1]"]
    keys = (prompt_key, "chosen", "score_chosen")
    return _example(where, prompt, responses, scores, id=row_id, keys=keys, labels=labels)


@register_schema("armorm")
def parse_armorm(row: dict[str, Any], where: str, opts: ParseOptions) -> Example:
    """On-policy sets such as ``princeton-nlp/llama3-ultrafeedback-armorm``."""
    keys = ("prompt", "all_generated_responses", "all_rm_scores")
    pieces = [_get(row, k, where) for k in keys]
    return _example(where, *pieces, id=_optional_str(row, "prompt_id", where), keys=keys)
