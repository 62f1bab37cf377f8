"""Evaluate a model: held-out constraint satisfaction, preference metrics, a reward-model judge.

    python -m prefopt.eval.evaluate     # SmolLM2: constraints + preference
    python -m prefopt.eval.evaluate model=checkpoint model.name_or_path=outputs/<exp>/<run>/final
    python -m prefopt.eval.evaluate tasks=[lengths] outputs=<dir>/generations.jsonl
    python -m prefopt.eval.evaluate tasks=[judge] judge.outputs=a/model_outputs.json \\
        judge.baseline=b/model_outputs.json judge.reward_model=<Hub id or dir of a reward model>

Tasks (``tasks=[...]``):

- ``constraints``: answer the offline benchmark's held-out tasks (``prompts``, greedy by
  default) and verify each answer: satisfaction (share of answers meeting every constraint),
  mean verifier score, per family, plus response lengths. ``outputs=`` scores an existing
  ``generations.jsonl`` instead of generating.
- ``preference``: the training loop's held-out evaluation of ``loss`` on ``dataset``'s eval split:
  reward accuracy and margin of the highest- vs lowest-scored response under the loss's implicit
  reward (default ``loss=simpo``: length-normalised log-probability, no reference needed, so
  every model is measured the same way). Losses with a reference need ``ref_model=``.
- ``lengths``: response length statistics of ``outputs`` (generations.jsonl or model_outputs.json).
- ``judge``: score two AlpacaEval-format output files (same instructions) with a Hub
  sequence-classification reward model; win rate and length-controlled win rate
  (``prefopt/eval/judge.py``).

Results go to ``<out_dir>/evaluation.json`` and are printed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import prefopt.losses  # noqa: F401  (registers loss schemas before composition)
from prefopt.checks import typed
from prefopt.config import EvaluateConfig
from prefopt.errors import report_user_errors
from prefopt.eval import constraints
from prefopt.eval.generate import (
    ResultsLog,
    check_settings,
    generate_all,
    inference_device,
    load_for_inference,
    model_id_of,
    ordered,
    settings_of,
)
from prefopt.eval.prompts import last_user, load_prompts, read_records
from prefopt.losses import build_loss
from prefopt.model import parallel
from prefopt.model.load import load_model
from prefopt.train.extras import ExtraEnv, StepExtras, StepRows, reference_model_needed
from prefopt.train.heldout import evaluate
from prefopt.train.passes import PassOptions
from prefopt.train.setup import make_autocast, prepare_data
from prefopt.train.step import LossContext

log = logging.getLogger("prefopt")
TASKS = ("constraints", "preference", "lengths", "judge")


def length_stats(texts: list[str], tokens: list[int] | None = None) -> dict[str, float]:
    """Mean / median / p90 of response length in words and characters (and tokens if known)."""
    out: dict[str, float] = {"n": len(texts)}
    series = {"words": [len(t.split()) for t in texts], "chars": [len(t) for t in texts]}
    if tokens is not None:
        series["tokens"] = tokens
    for name, xs in series.items():
        xs = sorted(xs)
        out[f"{name}/mean"] = round(statistics.fmean(xs), 2) if xs else 0.0
        out[f"{name}/median"] = float(statistics.median(xs)) if xs else 0.0
        out[f"{name}/p90"] = float(xs[max(0, (9 * len(xs) + 9) // 10 - 1)]) if xs else 0.0
    return out


def read_outputs(path: str) -> list[dict[str, Any]]:
    """Records with ``prompt`` text and first ``output`` from generations.jsonl (prefopt) or an
    AlpacaEval model_outputs.json."""
    rows = []
    for where, row in read_records(path):
        if "outputs" in row:  # prefopt's generations.jsonl
            rows.append(
                {
                    "id": row["id"],
                    "instruction": last_user(row),
                    "output": row["outputs"][0],
                    "tokens": row["output_tokens"][0],
                    "ended": row["ended"][0],
                    "meta": row.get("meta", {}),
                }
            )
        elif {"instruction", "output"} <= set(row):
            rows.append(
                {
                    "id": where,
                    "instruction": row["instruction"],
                    "output": row["output"],
                    "meta": {},
                }
            )
        else:
            raise ValueError(
                f"{where}: expected a generations.jsonl record or an AlpacaEval "
                "row with 'instruction' and 'output'"
            )
    return rows


def constraint_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = [r["meta"] for r in rows]
    if not all("family" in t for t in tasks):
        raise ValueError(
            "constraints: these outputs are not answers to constraint tasks "
            "(their records carry no 'family'); use prompts=constraints"
        )
    report = constraints.satisfaction(tasks, [r["output"] for r in rows])
    tokens = [r["tokens"] for r in rows] if all("tokens" in r for r in rows) else None
    report["lengths"] = length_stats([r["output"] for r in rows], tokens)
    if all("ended" in r for r in rows):
        report["ended_with_eos"] = round(sum(r["ended"] for r in rows) / max(1, len(rows)), 4)
    return report


def generate_for_constraints(
    cfg: EvaluateConfig, model: PreTrainedModel, tok: PreTrainedTokenizerBase
) -> str:
    """Answer the prompt set into ``<out_dir>/constraints/generations.jsonl`` (resumable)."""
    out = Path(cfg.out_dir, "constraints")
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out / "generation_settings.json", settings_of(cfg, model_id_of(cfg)))
    prompts = load_prompts(cfg.prompts)
    results = ResultsLog(out / "generations.jsonl")
    generate_all(model, tok, prompts, cfg.generation, results, cfg.seed)
    path = out / "generations_ordered.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ordered(prompts, results)))
    return str(path)


def preference(
    cfg: EvaluateConfig, hf_model: PreTrainedModel, tok: PreTrainedTokenizerBase
) -> dict[str, float]:
    """Held-out metrics of ``loss`` with the training loop's own evaluation code."""
    world = parallel.init_distributed(cfg.device, cfg.trainer.collective_timeout_s)
    spec, loss_fn = build_loss(cfg.loss)
    data = prepare_data(cfg, tok, spec)
    precision = parallel.resolve_precision(world.device, cfg.trainer.precision, "float32")
    autocast = make_autocast(precision, world.device)
    policy = parallel.shard(hf_model, world, precision, trainable=False)
    ref = None
    if reference_model_needed(spec, cfg.loss, "model", training=False):
        if not cfg.ref_model:
            raise ValueError(
                f"loss {spec.name!r} needs a reference model: set ref_model=<the "
                "starting model's directory or Hub id>, or use a reference-free "
                "loss (loss=simpo)"
            )
        ref_cfg = dataclasses.replace(cfg.model, name_or_path=cfg.ref_model, source="hub")
        ref_hf = load_model(ref_cfg, cfg.cache_dir, tok, cfg.seed)
        ref = parallel.shard(ref_hf, world, precision, trainable=False)
    state = spec.init_state(cfg.loss) if spec.state else None
    t = cfg.trainer
    passes = PassOptions.of(t, tok.pad_token_id, autocast)
    extras = StepExtras.build(spec, cfg.loss, ExtraEnv(ref, passes, tok.eos_token_id))
    ctx = LossContext(spec, loss_fn, t.logps_chunk_size, state)
    metrics = evaluate(policy, ref, StepRows.split(data.eval, data.eval_views), ctx, passes, extras)
    return {"loss_name": spec.name, **metrics}


def judge(cfg: EvaluateConfig) -> dict[str, Any]:
    from prefopt.eval.judge import load_reward_model, score, win_rates

    j = cfg.judge
    if not (j.outputs and j.baseline):
        raise ValueError(
            "tasks=[judge] needs judge.outputs and judge.baseline "
            "(AlpacaEval-format model_outputs.json files)"
        )
    ours, base = read_outputs(j.outputs), read_outputs(j.baseline)
    by_instruction = {r["instruction"]: r for r in base}
    missing = [r["instruction"] for r in ours if r["instruction"] not in by_instruction]
    if missing:
        raise ValueError(
            f"judge.baseline has no answer for {len(missing)} of judge.outputs' "
            f"instructions, e.g. {missing[0][:80]!r}"
        )
    base = [by_instruction[r["instruction"]] for r in ours]
    rm, rm_tok = load_reward_model(
        j.reward_model, device=inference_device(cfg.device), dtype=j.dtype
    )
    prompts = [r["instruction"] for r in ours]
    kw = dict(batch_size=j.batch_size, max_length=j.max_length)
    s_ours = score(rm, rm_tok, prompts, [r["output"] for r in ours], **kw)
    s_base = score(rm, rm_tok, prompts, [r["output"] for r in base], **kw)
    # Characters, as AlpacaEval's length control uses: independent of any tokenizer.
    result = win_rates(
        s_ours, s_base, [len(r["output"]) for r in ours], [len(r["output"]) for r in base]
    )
    return {
        "reward_model": j.reward_model,
        "outputs": j.outputs,
        "baseline": j.baseline,
        **result,
        "mean_reward": statistics.fmean(s_ours),
        "baseline_mean_reward": statistics.fmean(s_base),
    }


def run(composed: DictConfig) -> dict[str, Any]:
    cfg = typed(composed, EvaluateConfig)  # the typed config from here on
    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; choose from {list(TASKS)}")
    results: dict[str, Any] = {"model": cfg.model.name_or_path}
    needs_model = ("constraints" in cfg.tasks and not cfg.outputs) or "preference" in cfg.tasks
    model, tok = load_for_inference(cfg) if needs_model else (None, None)
    if "constraints" in cfg.tasks:  # before preference: sharding changes the model in place
        path = cfg.outputs or generate_for_constraints(cfg, model, tok)
        results["constraints"] = constraint_report(read_outputs(path))
    if "lengths" in cfg.tasks:
        if not cfg.outputs:
            raise ValueError(
                "tasks=[lengths] needs outputs=<generations.jsonl or model_outputs.json>"
            )
        rows = read_outputs(cfg.outputs)
        tokens = [r["tokens"] for r in rows] if all("tokens" in r for r in rows) else None
        results["lengths"] = length_stats([r["output"] for r in rows], tokens)
    if "preference" in cfg.tasks:
        results["preference"] = preference(cfg, model, tok)
    if "judge" in cfg.tasks:
        results["judge"] = judge(cfg)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.out_dir, "evaluation.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2), flush=True)
    return results


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
