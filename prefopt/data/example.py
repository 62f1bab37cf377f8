"""The canonical multi-response example and the error raised for malformed input."""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.errors import DataError

__all__ = ["DataError", "Example", "Message"]
Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class Example:
    """One prompt with K >= 2 scored responses.

    ``prompt`` is a list of chat messages ending with a user turn (plain-text prompts become one
    user message). ``responses[k]`` is the assistant's reply text, ``scores[k]`` its scalar reward.
    Pairwise sources without scores use (1.0, 0.0).
    """

    prompt: list[Message]
    responses: list[str]
    scores: list[float]
    id: str = ""
