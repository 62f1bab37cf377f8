# .venv/bin/pytest tests/test_evaluate.py -q
"""On-policy data generation (prefopt.eval.datagen) and evaluation tasks (prefopt.eval.evaluate)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import compose_config, read_jsonl, run_cli, save_tiny_rm, write_jsonl

from prefopt.data.schemas import ParseOptions, parse_row
from prefopt.eval import constraints, datagen, evaluate
from prefopt.eval.judge import load_reward_model, score
from prefopt.model.load import load_model, tiny_tokenizer

PREFERENCE = ("tasks=[preference]", "dataset.max_train_examples=4", "dataset.max_eval_examples=8")
DATAGEN = ("prompts.n=12", "generation.max_new_tokens=6", "generation.batch_size=4")


def _compose(name: str, out_dir: Path, *overrides: str):
    return compose_config(name, "model=tiny", *overrides, out_dir=out_dir)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> str:
    return save_tiny_rm(tmp_path_factory.mktemp("rm"))


# ------------------------------------------------------------------ datagen
def _rec(i: int, outputs: list[str], scores: list[float], meta: dict | None = None) -> dict:
    return {
        "id": f"p{i}",
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "meta": meta if meta is not None else {"family": "case", "params": {"w": i}},
        "outputs": outputs,
        "scores": scores,
    }


def test_dataset_rows_drops_and_counts():
    records = [
        _rec(0, ["a", "b", "c"], [1, 2, 3]),  # kept
        _rec(1, ["a", "", "  ", "d"], [1, 0, 0, 5]),  # two empties dropped, kept
        _rec(2, ["a", ""], [3, 0]),  # fewer than 2 after the empty is dropped
        _rec(3, ["", ""], [0, 0]),  # nothing left
        _rec(4, ["a", "b", ""], [2, 2, 0]),  # all equal once the empty is gone
        _rec(5, ["a", "b"], [0.5, 0.5], meta={"dataset": "x"}),  # all equal
    ]
    rows, counts = datagen.dataset_rows(records, drop_ties=True)
    assert counts == Counter(kept=2, empty_responses=6, dropped_fewer_than_2=2, dropped_all_equal=2)
    assert counts["kept"] + counts["dropped_fewer_than_2"] + counts["dropped_all_equal"] == 6
    assert rows[0] == {
        "id": "p0",
        "prompt": [{"role": "user", "content": "q0"}],
        "responses": ["a", "b", "c"],
        "scores": [1.0, 2.0, 3.0],
        "family": "case",
        "params": {"w": 0},
    }
    assert rows[1]["responses"] == ["a", "d"] and rows[1]["scores"] == [1.0, 5.0]
    assert all(isinstance(s, float) for r in rows for s in r["scores"])

    rows, counts = datagen.dataset_rows(records, drop_ties=False)
    assert [r["id"] for r in rows] == ["p0", "p1", "p4", "p5"]
    assert counts["dropped_all_equal"] == 0 and counts["kept"] == 4
    assert "family" not in rows[3] and "dataset" not in rows[3]  # only family/params are kept
    for i, row in enumerate(rows):
        parse_row("canonical", row, f"row {i}", ParseOptions())


@pytest.fixture(scope="module")
def datagen_straight(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("datagen") / "straight"
    summary = datagen.run(_compose("datagen", out, *DATAGEN))
    return out, summary


def test_datagen_rows_are_canonical_and_verifier_scored(datagen_straight):
    out, summary = datagen_straight
    recs = read_jsonl(out / "generations.jsonl")
    tasks = constraints.make_tasks("train", 12, 0)
    assert sorted(r["id"] for r in recs) == [t.id for t in tasks]  # each prompt exactly once
    for r in recs:
        assert len(r["outputs"]) == len(r["scores"]) == len(r["passed"]) == 4
        verdicts = [constraints.verify(r["meta"], text) for text in r["outputs"]]
        assert r["scores"] == [v.score for v in verdicts]
        assert r["passed"] == [v.passed for v in verdicts]
    rows = read_jsonl(Path(summary["out_file"]))
    assert summary["out_file"] == str(out / "dataset.jsonl")
    by_task = {t.id: t for t in tasks}
    for i, row in enumerate(rows):
        ex = parse_row("canonical", row, f"dataset.jsonl row {i}", ParseOptions())
        assert ex.id == row["id"] and len(ex.responses) >= 2 and len(set(ex.scores)) > 1
        task = by_task[row["id"]]
        assert (row["family"], row["params"]) == (task.family, task.params)
        assert row["prompt"] == [{"role": "user", "content": task.prompt}]
        assert row["scores"] == [constraints.verify(row, t).score for t in row["responses"]]
    assert [r["id"] for r in rows] == [t.id for t in tasks if t.id in {r["id"] for r in rows}]
    kept, few, ties = (
        summary.get(k, 0) for k in ("kept", "dropped_fewer_than_2", "dropped_all_equal")
    )
    assert kept == len(rows) >= 1 and kept + few + ties == 12
    assert summary["empty_responses"] == sum(t == "" for r in recs for t in r["outputs"])
    all_scores = [s for r in recs for s in r["scores"]]
    assert summary["mean_score"] == pytest.approx(sum(all_scores) / len(all_scores), abs=1e-4)
    passed = [p for r in recs for p in r["passed"]]
    assert summary["sample_pass_rate"] == pytest.approx(sum(passed) / len(passed), abs=1e-4)
    assert json.loads((out / "datagen_summary.json").read_text()) == summary
    assert summary["generation"]["prompts"] == 12


def test_datagen_resumes_after_interruption(datagen_straight, tmp_path, monkeypatch):
    straight, _ = datagen_straight
    calls, real = [], datagen.verifier_scorer

    def flaky(prompts, records):
        calls.append(len(records))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while scoring the second batch
        real(prompts, records)

    monkeypatch.setattr(datagen, "verifier_scorer", flaky)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        datagen.run(_compose("datagen", out, *DATAGEN))
    assert len(read_jsonl(out / "generations.jsonl")) == 4 and not (out / "dataset.jsonl").exists()
    monkeypatch.undo()
    summary = datagen.run(_compose("datagen", out, *DATAGEN))
    assert summary["generation"]["generated_now"] == 8
    recs = read_jsonl(out / "generations.jsonl")
    assert len(recs) == 12 == len({r["id"] for r in recs})  # each prompt exactly once
    assert recs == read_jsonl(straight / "generations.jsonl")
    assert (out / "dataset.jsonl").read_bytes() == (straight / "dataset.jsonl").read_bytes()


def test_datagen_with_a_reward_model(tmp_path, rm_dir):
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [{"instruction": f"Tell me about {w}."} for w in ("cats", "rain", "tea")],
    )
    out = tmp_path / "rm"
    summary = datagen.run(
        _compose(
            "datagen",
            out,
            "prompts=local",
            f"prompts.path={prompts}",
            "prompts.name=mine",
            "generation.max_new_tokens=5",
            "generation.num_samples=3",
            "scorer.kind=reward_model",
            f"scorer.reward_model={rm_dir}",
            "scorer.batch_size=2",
            "drop_ties=false",
        )
    )
    rm, rm_tok = load_reward_model(rm_dir)
    for r in read_jsonl(out / "generations.jsonl"):
        assert "passed" not in r and len(r["scores"]) == 3
        alone = [score(rm, rm_tok, [r["prompt"]], [t])[0] for t in r["outputs"]]
        torch.testing.assert_close(r["scores"], alone, rtol=0, atol=1e-4)
    assert "sample_pass_rate" not in summary
    for i, row in enumerate(read_jsonl(out / "dataset.jsonl")):
        parse_row("canonical", row, f"row {i}", ParseOptions())
        assert "family" not in row


def test_datagen_config_errors(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "hi"}, {"instruction": "yo"}])
    local = ("prompts=local", f"prompts.path={prompts}", "generation.max_new_tokens=2")
    with pytest.raises(ValueError, match="not a constraint task"):
        datagen.run(_compose("datagen", tmp_path / "a", *local))
    with pytest.raises(ValueError, match="scorer.reward_model is required"):
        datagen.run(_compose("datagen", tmp_path / "b", *local, "scorer.kind=reward_model"))
    with pytest.raises(ValueError, match="scorer.kind must be"):
        datagen.run(_compose("datagen", tmp_path / "c", *local, "scorer.kind=oracle"))


def test_datagen_cli_smoke(tmp_path):
    run_dir = tmp_path / "cli"
    overrides = ("model=tiny", "prompts.n=4", "generation.max_new_tokens=4")
    proc = run_cli("prefopt.eval.datagen", *overrides, run_dir=run_dir)
    assert f"-> {run_dir / 'dataset.jsonl'}" in proc.stdout
    summary = json.loads((run_dir / "datagen_summary.json").read_text())
    assert summary["out_file"] == str(run_dir / "dataset.jsonl")
    kept = sum(summary.get(k, 0) for k in ("kept", "dropped_fewer_than_2", "dropped_all_equal"))
    assert kept == 4 == len(read_jsonl(run_dir / "generations.jsonl"))
    assert len(read_jsonl(run_dir / "dataset.jsonl")) == summary.get("kept", 0)
    settings = json.loads((run_dir / "generation_settings.json").read_text())
    assert settings["prompts"]["split"] == "train" and settings["generation"]["num_samples"] == 4
    assert (run_dir / ".hydra" / "config.yaml").is_file()


# ------------------------------------------------------------------ evaluate: lengths, constraints
def test_lengths_of_model_outputs(tmp_path):
    texts = ["one two three", "a b", "", "x y z w", "hello"]
    path = tmp_path / "model_outputs.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": f"i{i}", "output": t, "generator": "m", "dataset": "d"}
                for i, t in enumerate(texts)
            ]
        )
    )
    out = tmp_path / "eval"
    res = evaluate.run(_compose("evaluate", out, "tasks=[lengths]", f"outputs={path}"))
    assert res["lengths"] == {
        "n": 5,
        "words/mean": 2.0,
        "words/median": 2.0,
        "words/p90": 4.0,  # 0 1 2 3 4
        "chars/mean": 5.6,
        "chars/median": 5.0,
        "chars/p90": 13.0,  # 0 3 5 7 13
    }
    assert json.loads((out / "evaluation.json").read_text()) == res
    with pytest.raises(ValueError, match="needs outputs="):
        evaluate.run(_compose("evaluate", out, "tasks=[lengths]"))


def test_length_stats_with_tokens():
    res = evaluate.length_stats(["a", "bb cc"], tokens=[3, 8])
    assert res["tokens/mean"] == 5.5 and res["tokens/median"] == 5.5 and res["tokens/p90"] == 8
    assert evaluate.length_stats([])["words/mean"] == 0.0


def test_length_stats_p90_is_the_nearest_rank_percentile():
    texts = [" ".join(["w"] * k) for k in range(1, 11)]  # 1..10 words
    assert evaluate.length_stats(texts)["words/p90"] == 9.0


def _generations(tmp_path: Path, tasks, answers: list[str]) -> Path:
    rows = [
        {
            "id": t.id,
            "prompt": [{"role": "user", "content": t.prompt}],
            "meta": {"family": t.family, "params": t.params},
            "prompt_tokens": 10,
            "outputs": [a],
            "output_tokens": [len(a.split()) + 1],
            "ended": [i % 4 != 0],
        }
        for i, (t, a) in enumerate(zip(tasks, answers, strict=True))
    ]
    return write_jsonl(tmp_path / "generations.jsonl", rows)


def test_constraints_on_given_outputs(tmp_path):
    tasks = constraints.make_tasks("heldout", 8, 0)
    answers = [constraints.ideal_response(t) if i % 2 == 0 else "no" for i, t in enumerate(tasks)]
    assert [constraints.verify(t, a).passed for t, a in zip(tasks, answers, strict=True)] == [
        True,
        False,
    ] * 4
    path = _generations(tmp_path, tasks, answers)
    res = evaluate.run(
        _compose("evaluate", tmp_path / "eval", "tasks=[constraints]", f"outputs={path}")
    )["constraints"]
    assert res["satisfaction"] == 0.5 and res["n"] == 8
    expected = sum(constraints.verify(t, a).score for t, a in zip(tasks, answers, strict=True)) / 8
    assert res["score"] == pytest.approx(expected)
    for t, a in zip(tasks, answers, strict=True):
        assert res[f"satisfaction/{t.family}"] == (1.0 if a != "no" else 0.0)
    assert res["ended_with_eos"] == 0.75
    assert res["lengths"]["n"] == 8 and "tokens/mean" in res["lengths"]
    assert not (tmp_path / "eval" / "constraints").exists()  # nothing generated


def test_constraints_refuse_outputs_without_tasks(tmp_path):
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps([{"instruction": "hi", "output": "yo"}]))
    with pytest.raises(ValueError, match="not answers to constraint tasks"):
        evaluate.run(_compose("evaluate", tmp_path / "e", "tasks=[constraints]", f"outputs={path}"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "text": "?"}])
    with pytest.raises(ValueError, match="bad.jsonl line 1: expected a generations.jsonl record"):
        evaluate.run(_compose("evaluate", tmp_path / "e", "tasks=[lengths]", f"outputs={bad}"))


def test_default_tasks_generate_with_the_tiny_model(tmp_path):
    # The default task list (constraints, then preference on the same, then sharded, model).
    out = tmp_path / "eval"
    res = evaluate.run(
        _compose("evaluate", out, "prompts.n=6", "generation.max_new_tokens=4", *PREFERENCE[1:])
    )
    rep = res["constraints"]
    assert rep["n"] == 6 and 0 <= rep["satisfaction"] <= 1 and 0 <= rep["score"] <= 10
    assert {"satisfaction", "score", "n", "lengths", "ended_with_eos"} <= set(rep)
    tasks = constraints.make_tasks("heldout", 6, 0)
    assert {k for k in rep if k.startswith("satisfaction/")} == {
        f"satisfaction/{t.family}" for t in tasks
    }
    assert rep["lengths"]["n"] == 6 and rep["lengths"]["tokens/mean"] <= 4
    ordered = read_jsonl(out / "constraints" / "generations_ordered.jsonl")
    assert [r["id"] for r in ordered] == [t.id for t in tasks]
    assert len(read_jsonl(out / "constraints" / "generations.jsonl")) == 6
    assert res["preference"]["loss_name"] == "simpo" and res["preference"]["valid_groups"] == 8
    assert res["model"] == "tiny-llama" and set(res) == {"model", "constraints", "preference"}
    assert json.loads((out / "evaluation.json").read_text()) == res


# ------------------------------------------------------------------ evaluate: preference


def test_preference_with_a_reference_free_loss(tmp_path):
    res = evaluate.run(_compose("evaluate", tmp_path / "eval", *PREFERENCE))["preference"]
    assert res["loss_name"] == "simpo" and res["valid_groups"] == 8
    assert 0.0 <= res["rewards/accuracy"] <= 1.0
    assert all(math.isfinite(v) for k, v in res.items() if k != "loss_name")


def _preference_against_a_copy(tmp_path, loss: str) -> dict:
    """Preference metrics of ``loss`` whose reference is a saved copy of the policy (same seed)."""
    ref = tmp_path / "ref"
    cfg = _compose("evaluate", tmp_path / "b", *PREFERENCE, f"loss={loss}", f"ref_model={ref}")
    tok = tiny_tokenizer()
    load_model(cfg.model, cfg.cache_dir, tok, cfg.seed).save_pretrained(ref)
    tok.save_pretrained(ref)
    return evaluate.run(cfg)["preference"]


def test_preference_with_a_reference_loss(tmp_path):
    with pytest.raises(ValueError, match="ref_model"):
        evaluate.run(_compose("evaluate", tmp_path / "a", *PREFERENCE, "loss=dpo"))
    # The reference is a saved copy of the policy (same seed): every implicit reward is 0.
    res = _preference_against_a_copy(tmp_path, "dpo")
    assert res["loss_name"] == "dpo" and res["valid_groups"] == 8
    assert res["rewards/margin"] == pytest.approx(0, abs=1e-5)
    assert res["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert res["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_preference_runs_the_loss_extras_inputs(tmp_path):
    """KTO's kl_estimate (its mismatched_kl extra) needs the reference in evaluation too; SPO's
    KL term (a regularizer) does not run there, so SPO needs none. With the reference a copy of
    the policy, z0 = 0 and r = 0: each labelled response costs lambda - lambda sigmoid(0) = 1/2."""
    with pytest.raises(ValueError, match="ref_model"):
        evaluate.run(_compose("evaluate", tmp_path / "a", *PREFERENCE, "loss=kto"))
    spo = evaluate.run(_compose("evaluate", tmp_path / "s", *PREFERENCE, "loss=spo"))
    assert spo["preference"]["valid_groups"] == 8
    res = _preference_against_a_copy(tmp_path, "kto")
    assert res["loss_name"] == "kto" and res["valid_groups"] == 8
    assert res["kto/z0"] == pytest.approx(0, abs=1e-5)
    assert res["loss"] == pytest.approx(0.5, abs=1e-5)


# ------------------------------------------------------------------ evaluate: judge, errors
INSTRUCTIONS = ["Name a fruit.", "Write a haiku.", "What is 2 + 2?", "Explain rain briefly."]


def _outputs(path: Path, pairs: list[tuple[str, str]]) -> str:
    path.write_text(
        json.dumps(
            [
                {"instruction": i, "output": o, "generator": path.stem, "dataset": "d"}
                for i, o in pairs
            ]
        )
    )
    return str(path)


def _judge(tmp_path: Path, rm_dir: str, outputs: str, baseline: str) -> dict:
    return evaluate.run(
        _compose(
            "evaluate",
            tmp_path / "eval",
            "tasks=[judge]",
            f"judge.reward_model={rm_dir}",
            f"judge.outputs={outputs}",
            f"judge.baseline={baseline}",
            "judge.batch_size=3",
        )
    )


def test_judge_with_a_tiny_reward_model(tmp_path, rm_dir):
    answer = {i: f"Answer {k}: " + "yes " * k for k, i in enumerate(INSTRUCTIONS)}
    ours = _outputs(tmp_path / "ours.json", [(i, answer[i]) for i in INSTRUCTIONS])
    shuffled = INSTRUCTIONS[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != INSTRUCTIONS
    base = _outputs(tmp_path / "base.json", [(i, "no") for i in shuffled])
    res = _judge(tmp_path, rm_dir, ours, base)["judge"]
    assert res["n"] == 4 and 0 <= res["win_rate"] <= 100 and 0 <= res["lc_win_rate"] <= 100
    assert res["outputs"] == ours and res["baseline"] == base and res["reward_model"] == rm_dir
    # Paired by instruction, not position: a file against its own shuffled copy is a draw.
    same = _outputs(tmp_path / "same.json", [(i, answer[i]) for i in shuffled])
    res = _judge(tmp_path, rm_dir, ours, same)["judge"]
    assert res["win_rate"] == pytest.approx(50, abs=1e-2)
    assert res["lc_win_rate"] == pytest.approx(50, abs=1e-2)
    assert res["mean_reward"] == pytest.approx(res["baseline_mean_reward"], abs=1e-4)
    assert res["avg_length"] == res["baseline_avg_length"]


def test_judge_errors(tmp_path, rm_dir):
    ours = _outputs(tmp_path / "ours.json", [(i, "x") for i in INSTRUCTIONS])
    base = _outputs(tmp_path / "base.json", [(i, "y") for i in INSTRUCTIONS[:3]])
    with pytest.raises(ValueError, match=r"judge.baseline has no answer for 1 of .*Explain rain"):
        _judge(tmp_path, rm_dir, ours, base)
    with pytest.raises(ValueError, match="needs judge.outputs and judge.baseline"):
        evaluate.run(_compose("evaluate", tmp_path / "e", "tasks=[judge]", f"judge.outputs={ours}"))


def test_unknown_task_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown \['bleu'\]"):
        evaluate.run(_compose("evaluate", tmp_path / "e", "tasks=[constraints,bleu]"))
    assert not (tmp_path / "e").exists()
