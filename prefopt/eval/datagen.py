"""Build an on-policy multi-response dataset: sample K responses per prompt, score them.

    python -m prefopt.eval.datagen   # SmolLM2, 240 train constraint tasks, verifier-scored, CPU
    python -m prefopt.eval.datagen prompts=constraints prompts.split=heldout prompts.n=64
    python -m prefopt.eval.datagen model=checkpoint model.name_or_path=... prompts=local \\
        prompts.path=instructions.jsonl scorer.kind=reward_model \\
        scorer.reward_model=Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 generation.num_samples=4

Scores come from the offline benchmark's verifiers (``scorer.kind=verifier``, constraint prompts)
or a sequence-classification reward model. Samples and scores are appended to
``<out_dir>/generations.jsonl`` batch by batch, so rerunning with the same ``hydra.run.dir``
resumes without repeating or losing a prompt. At the end ``out_file`` gets the canonical rows
(``id, prompt, responses, scores`` plus the task's ``family``/``params``): empty responses are
dropped, and so are groups left with fewer than 2 responses or whose scores are all equal
(``drop_ties``; such groups teach a preference loss nothing). Every drop is counted.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from prefopt.checks import typed
from prefopt.config import DatagenConfig, ScorerConfig
from prefopt.errors import report_user_errors
from prefopt.eval import constraints
from prefopt.eval.generate import (
    ResultsLog,
    check_settings,
    generate_all,
    load_for_inference,
    model_id_of,
    ordered,
    settings_of,
)
from prefopt.eval.prompts import Prompt, Record, load_prompts

Scorer = Callable[[list[Prompt], list[Record]], None]  # adds "scores" to each record


def verifier_scorer(prompts: list[Prompt], records: list[Record]) -> None:
    for p, rec in zip(prompts, records, strict=True):
        if "family" not in p.meta:
            raise ValueError(
                f"prompt {p.id!r} is not a constraint task; scorer.kind=verifier "
                "needs prompts=constraints (or scorer.kind=reward_model)"
            )
        verdicts = [constraints.verify(p.meta, text) for text in rec["outputs"]]
        rec["scores"] = [v.score for v in verdicts]
        rec["passed"] = [v.passed for v in verdicts]


def reward_model_scorer(cfg: ScorerConfig, device: str) -> Scorer:
    from prefopt.eval.judge import load_reward_model, score

    if not cfg.reward_model:
        raise ValueError("scorer.reward_model is required when scorer.kind=reward_model")
    rm, rm_tok = load_reward_model(cfg.reward_model, device=device)

    def scorer(prompts: list[Prompt], records: list[Record]) -> None:
        flat = [(rec["prompt"], text) for rec in records for text in rec["outputs"]]
        scores = score(
            rm,
            rm_tok,
            [p for p, _ in flat],
            [t for _, t in flat],
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
        )
        k = len(records[0]["outputs"])
        for i, rec in enumerate(records):
            rec["scores"] = scores[i * k : (i + 1) * k]

    return scorer


def dataset_rows(records: list[Record], drop_ties: bool) -> tuple[list[dict[str, Any]], Counter]:
    """Canonical rows from scored records, and what was dropped (counted)."""
    rows, counts = [], Counter()
    for rec in records:
        pairs = [(t, s) for t, s in zip(rec["outputs"], rec["scores"], strict=True) if t.strip()]
        counts["empty_responses"] += len(rec["outputs"]) - len(pairs)
        if len(pairs) < 2:
            counts["dropped_fewer_than_2"] += 1
            continue
        if drop_ties and len({s for _, s in pairs}) == 1:
            counts["dropped_all_equal"] += 1
            continue
        row = {
            "id": rec["id"],
            "prompt": rec["prompt"],
            "responses": [t for t, _ in pairs],
            "scores": [float(s) for _, s in pairs],
        }
        rows.append(row | {k: rec["meta"][k] for k in ("family", "params") if k in rec["meta"]})
        counts["kept"] += 1
    return rows, counts


def write_jsonl_atomic(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    os.replace(tmp, path)


def run(composed: DictConfig) -> dict[str, Any]:
    cfg = typed(composed, DatagenConfig)  # the typed config from here on
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg.prompts)
    settings = settings_of(cfg, model_id_of(cfg))
    settings["key"] += f"|{cfg.scorer.kind}|{cfg.scorer.reward_model}"
    check_settings(out / "generation_settings.json", settings)
    model, tok = load_for_inference(cfg)
    device = str(next(model.parameters()).device)
    if cfg.scorer.kind == "verifier":
        scorer = verifier_scorer
    elif cfg.scorer.kind == "reward_model":
        scorer = reward_model_scorer(cfg.scorer, device)
    else:
        raise ValueError(f"scorer.kind must be verifier or reward_model, got {cfg.scorer.kind!r}")
    results = ResultsLog(out / "generations.jsonl")
    stats = generate_all(model, tok, prompts, cfg.generation, results, cfg.seed, scorer)
    records = ordered(prompts, results)
    rows, counts = dataset_rows(records, cfg.drop_ties)
    write_jsonl_atomic(rows, Path(cfg.out_file))
    scores = torch.tensor([s for r in records for s in r["scores"]], dtype=torch.float64)
    summary = {
        "out_file": str(cfg.out_file),
        **counts,
        "generation": stats,
        "mean_score": round(float(scores.mean()), 4),
    }
    if records and "passed" in records[0]:
        summary["sample_pass_rate"] = round(
            sum(sum(r["passed"]) for r in records) / sum(len(r["passed"]) for r in records), 4
        )
    (out / "datagen_summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"{counts['kept']} groups -> {cfg.out_file}; dropped: "
        f"{ {k: v for k, v in counts.items() if k != 'kept'} }",
        flush=True,
    )
    return summary


@hydra.main(config_path="../../conf", config_name="datagen", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
