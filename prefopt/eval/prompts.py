"""Prompt sets: reading AlpacaEval, Arena-Hard, prefopt and constraint-benchmark prompts, and
encoding them with the model's chat template exactly as in training (one BOS).

``prompts.source=file`` reads a JSON list or JSONL file, local or ``hf://``;
``prompts.source=constraints`` generates the offline benchmark's tasks in code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from prefopt.config import GenerationConfig, PromptsConfig
from prefopt.data.example import DataError, Message
from prefopt.data.tokenize import TokenizeOptions, Tokenizer, keep_end
from prefopt.errors import hub_download
from prefopt.eval import constraints

Record = dict[str, Any]  # one generations.jsonl row: a prompt, its samples and their counts


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[Message]  # ends with the user turn to answer
    meta: dict[str, Any] = field(default_factory=dict)  # source fields the output files keep


def read_records(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) from a JSON list or JSONL file, local or ``hf://`` (datasets' json loader)."""
    if not path.startswith("hf://"):
        if not os.path.isfile(path):
            raise DataError(f"{path} does not exist", fix="check the path (a JSON or JSONL file)")
        text = Path(path).read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            rows = json.loads(text)
            yield from ((f"{path} item {i}", row) for i, row in enumerate(rows))
            return
        for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): see ResultsLog
            if line.strip():
                try:
                    yield f"{path} line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: invalid JSON ({e.msg})") from e
        return
    repo = "/".join(path.removeprefix("hf://datasets/").split("/")[:2])
    with hub_download("prompt set", repo, "dataset"):  # offline: one message naming the repo
        rows = datasets.load_dataset("json", data_files=path, split="train")
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def prompt_from_row(row: Any, index: int, where: str) -> Prompt:
    """One prompt from an AlpacaEval (``instruction``), Arena-Hard v0.1 (``question_id``,
    ``turns``), Arena-Hard v2 (``uid``, ``prompt``) or prefopt (``id``, ``prompt``) row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    meta = {k: row[k] for k in ("dataset", "category", "cluster", "family", "params") if k in row}
    pid = str(next((row[k] for k in ("question_id", "uid", "id") if row.get(k) is not None), index))
    if "instruction" in row:
        content, key = row["instruction"], "instruction"
    elif "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or len(turns) != 1 or not isinstance(turns[0], dict):
            raise DataError(
                f"{where}: key 'turns': expected one turn ({{'content': ...}}); "
                "multi-turn prompt sets are not supported"
            )
        content, key = turns[0].get("content"), "turns[0].content"
    elif "prompt" in row:
        content, key = row["prompt"], "prompt"
        if isinstance(content, list):
            ok = all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in content
            )
            if not (content and ok and content[-1]["role"] == "user"):
                raise DataError(f"{where}: key 'prompt': chat messages must end with a user turn")
            if not content[-1]["content"].strip():
                raise DataError(f"{where}: key 'prompt': the last user message is empty")
            return Prompt(pid, [dict(m) for m in content], meta)
    else:
        raise DataError(f"{where}: no prompt: expected key 'instruction', 'turns' or 'prompt'")
    if not isinstance(content, str) or not content.strip():
        raise DataError(f"{where}: key {key!r}: expected a non-empty string")
    return Prompt(pid, [{"role": "user", "content": content}], meta)


def load_prompts(cfg: PromptsConfig) -> list[Prompt]:
    """The prompt set ``prompts`` names (``limit`` keeps the first N); ids must be unique."""
    if cfg.source == "constraints":
        tasks = constraints.make_tasks(cfg.split, cfg.n, cfg.seed)
        prompts = [
            Prompt(
                t.id,
                [{"role": "user", "content": t.prompt}],
                {"family": t.family, "params": t.params},
            )
            for t in tasks
        ]
    elif cfg.source == "file":
        if not cfg.path:
            raise ValueError("prompts.path is required when prompts.source=file")
        prompts = [
            prompt_from_row(row, i, where) for i, (where, row) in enumerate(read_records(cfg.path))
        ]
    else:
        raise ValueError(f"prompts.source must be 'file' or 'constraints', got {cfg.source!r}")
    prompts = prompts[: cfg.limit] if cfg.limit else prompts
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise DataError(f"prompts {cfg.name!r}: prompt id {p.id!r} appears twice")
        seen.add(p.id)
    if not prompts:
        raise DataError(f"prompts {cfg.name!r}: no prompts")
    return prompts


def last_user(record: Record) -> str:
    return next(m["content"] for m in reversed(record["prompt"]) if m["role"] == "user")


# ------------------------------------------------------------------ encoding
def encode_prompts(
    tok: PreTrainedTokenizerBase, prompts: list[Prompt], gen: GenerationConfig
) -> tuple[list[list[int]], int]:
    """Chat-templated prompt ids (one BOS, as in training); over-long prompts keep their end."""
    opts = TokenizeOptions(
        max_length=gen.max_prompt_length + 1,
        max_prompt_length=gen.max_prompt_length,
        system_prompt=gen.system_prompt,
    )
    tokenizer = Tokenizer(tok, opts)
    ids, cut = [], 0
    for p in prompts:
        x = tokenizer.prompt_ids(p.messages)
        if len(x) > gen.max_prompt_length:
            x = keep_end(x, gen.max_prompt_length, tok.bos_token_id)
            cut += 1
        ids.append(x)
    return ids, cut
