"""Benchmark submission files from a run's generations: AlpacaEval and Arena-Hard-Auto.

- ``model_outputs.json``: AlpacaEval's format (instruction, output, generator, dataset);
- ``arena_hard/<model_id>.jsonl``: Arena-Hard-Auto v0.1's model_answer format.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from prefopt.eval.prompts import Record, last_user


def alpaca_eval_outputs(records: list[Record], model_id: str, dataset: str) -> list[Record]:
    """AlpacaEval's model_outputs.json: one object per instruction, in the prompt set's order."""
    return [
        {
            "instruction": last_user(r),
            "output": r["outputs"][0],
            "generator": model_id,
            "dataset": r["meta"].get("dataset", dataset),
        }
        for r in records
    ]


def arena_hard_answers(records: list[Record], model_id: str) -> list[Record]:
    """Arena-Hard-Auto v0.1 model_answer rows (answer ids are stable across reruns)."""
    now = time.time()
    return [
        {
            "question_id": r["id"],
            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{r['id']}").hex,
            "model_id": model_id,
            "choices": [
                {
                    "index": 0,
                    "turns": [{"content": r["outputs"][0], "token_len": r["output_tokens"][0]}],
                }
            ],
            "tstamp": now,
        }
        for r in records
    ]


def write_submissions(out: Path, records: list[Record], model_id: str, dataset: str) -> Path:
    """Write both files into ``out``; return the Arena-Hard file's path."""
    (out / "model_outputs.json").write_text(
        json.dumps(alpaca_eval_outputs(records, model_id, dataset), indent=2, ensure_ascii=False)
    )
    arena = out / "arena_hard" / f"{model_id}.jsonl"
    arena.parent.mkdir(exist_ok=True)
    arena.write_text(
        "".join(
            json.dumps(a, ensure_ascii=False) + "\n" for a in arena_hard_answers(records, model_id)
        )
    )
    return arena
