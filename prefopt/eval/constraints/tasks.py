"""Tasks of the constraint benchmark: generation into splits, verification, JSONL rows.

Splits are decided by a hash of the prompt text, so train and heldout never share a prompt.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prefopt.eval.constraints.families import FAMILIES
from prefopt.eval.constraints.verifiers import Params

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20
MAX_DRAWS = 20_000  # per task; only hit once a family's pool of distinct prompts runs dry


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
