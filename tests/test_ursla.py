# .venv/bin/pytest tests/test_ursla.py -q
"""prefopt.eval.ursla: LP̄ against naive full-logit NLLs, both readings' columns and counts, the CLI
on the tiny model (dataset and AlpacaEval outputs), and the notebook executed headless."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, compose_config, run_cli
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from prefopt.config import ModelConfig
from prefopt.data.example import DataError
from prefopt.eval.ursla import aggregate, format_table, measure, run
from prefopt.model.load import load_model

PROMPTS = ["Say a letter.", "Say a letter.", [{"role": "user", "content": "Spell abcde."}]]
TEXTS = ["a", "abc", "abcde"]  # one token per byte: 1, 3 and 5 scored tokens (+ EOS)


@pytest.fixture(scope="module")
def model(tok):
    cfg = OmegaConf.structured(ModelConfig(name_or_path="tiny", source="tiny"))
    return load_model(cfg, "", tok, seed=0)


def naive_nlls(model, tok, prompt, text: str, include_eos: bool) -> list[float]:
    """Chat template by hand, the whole sequence's fp64 logits, one token at a time."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    p = tok(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    ).input_ids
    r = [*tok(text, add_special_tokens=False).input_ids, *([tok.eos_token_id] * include_eos)]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + r])).logits[0].double().log_softmax(-1)
    return [-logp[len(p) + j - 1, r[j]].item() for j in range(len(r))]


@pytest.mark.parametrize("include_eos", [False, True])
def test_measure_matches_naive_nlls(model, tok, include_eos):
    x = [naive_nlls(model, tok, p, t, include_eos) for p, t in zip(PROMPTS, TEXTS, strict=True)]
    assert [len(v) for v in x] == [1 + include_eos, 3 + include_eos, 5 + include_eos]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    prefix = measure(model, tok, PROMPTS, TEXTS, [1, 3, 5], include_eos=include_eos, batch_size=2)
    want = [mean([v[0] for v in x]), mean([mean(v[:3]) for v in x[1:]]), mean(x[2][:5])]
    assert prefix["counts"] == [3, 2, 1]
    assert prefix["values"] == pytest.approx(want, abs=1e-5)
    assert prefix["response_tokens"]["max"] == 5 + include_eos
    # window 1: column L holds len(y) = L - 1 or L; each response alone in its bucket
    length = measure(
        model,
        tok,
        PROMPTS,
        TEXTS,
        [2, 4, 6] if include_eos else [1, 3, 5],
        "length",
        window=1,
        include_eos=include_eos,
        batch_size=3,
    )
    assert length["counts"] == [1, 1, 1]
    assert length["values"] == pytest.approx([mean(v) for v in x], abs=1e-5)


def test_padding_and_order_do_not_change_values(model, tok):
    one = measure(model, tok, PROMPTS, TEXTS, [1, 2, 3], batch_size=1)
    three = measure(model, tok, PROMPTS[::-1], TEXTS[::-1], [1, 2, 3], batch_size=3)
    assert one["values"] == pytest.approx(three["values"], abs=1e-5)


def test_prefix_columns_and_empty_column_note():
    nlls = [[3.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0, 1.0, 6.0]]
    cols = aggregate(nlls, [1, 3, 5], [1, 3, 5, 7], "prefix")
    assert [c["count"] for c in cols] == [3, 2, 1, 0]
    assert [c["value"] for c in cols[:3]] == pytest.approx([2.0, (2.0 + 1.0) / 2, 2.0])
    assert cols[3]["value"] is None and cols[3]["note"] == "no response has >= 7 tokens"
    assert cols[0]["stderr"] == pytest.approx(((1 + 0 + 1) / 2 / 3) ** 0.5)


def test_length_buckets_tile_the_paper_columns():
    n = [1, 100, 101, 300, 301, 500, 600, 700, 900, 901, 1101]
    nlls = [[float(i)] * k for i, k in enumerate(n)]  # response i has LP̄ = i
    cols = aggregate(nlls, n, [1, 201, 401, 801, 1001], "length", window=100)
    # [1, 100], [101, 300], [301, 500], [701, 900], [901, 1100]: 600, 700 and 1101 in none
    assert [c["count"] for c in cols] == [2, 2, 2, 1, 1]
    assert [c["value"] for c in cols] == pytest.approx([0.5, 2.5, 4.5, 8.0, 9.0])
    wide = aggregate(nlls, n, [201, 401], "length", window=200)  # overlap: 301 counts twice
    assert [c["count"] for c in wide] == [5, 4]
    empty = aggregate(nlls, n, [2000], "length", window=100)[0]
    assert empty["count"] == 0 and empty["note"] == "no response has 1900 to 2099 tokens"
    result = {"reading": "length", "lengths": [2000], "columns": [empty]}
    table = format_table(result, "alpaca", "m")
    assert "- (n=0)" in table and "note: L=2000" in table


def test_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="reading"):
        measure(model, tok, PROMPTS, TEXTS, [1], "suffix")
    with pytest.raises(ValueError, match="prompts"):
        measure(model, tok, PROMPTS[:2], TEXTS, [1])
    with pytest.raises(ConfigCompositionException):
        _cfg("readng=length")


def _cfg(*overrides: str):
    return compose_config("ursla", "model=tiny", *overrides)


def test_cli_on_the_tiny_model_writes_ursla_json(tmp_path):
    run_dir = tmp_path / "run"
    overrides = (
        "model=tiny",
        "dataset.max_train_examples=4",
        "lengths=[1,10,2000]",
        "num_threads=1",
    )
    proc = run_cli("prefopt.eval.ursla", *overrides, run_dir=run_dir, timeout=120)
    assert "LP(y)_2000" in proc.stdout and "(n=16)" in proc.stdout
    assert "note: L=2000: no response has >= 2000 tokens" in proc.stdout
    out = json.loads((run_dir / "ursla.json").read_text())
    assert out["model"] == "tiny-llama" and out["reading"] == "prefix"
    assert out["counts"][0] == 16 and out["counts"][2] == 0 and out["values"][2] is None
    assert out["settings"]["device"] == "cpu" and out["paper"]["values"][0] == 0.493


def test_best_responses_of_the_dataset(tmp_path):
    out = run(_cfg(f"run_dir={tmp_path}", "max_examples=3", "responses=best", "lengths=[1]"))
    assert out["n_responses"] == 3


def test_alpaca_eval_outputs(tmp_path):
    rows = [
        {
            "instruction": f"Count to {i}.",
            "output": " ".join(map(str, range(1, i + 1))),
            "generator": "tiny-sft",
            "dataset": "helpful_base",
        }
        for i in (1, 3, 8)
    ]
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps(rows))
    out = run(_cfg(f"run_dir={tmp_path}", f"outputs={path}", "lengths=[1,5,15]", "batch_size=2"))
    assert out["counts"] == [3, 2, 1]  # 1, 5 and 15 tokens
    assert out["generators"] == ["tiny-sft"] and out["source"] == str(path)
    assert json.loads((tmp_path / "ursla.json").read_text())["counts"] == [3, 2, 1]
    path.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(DataError, match="entry 0: key 'output'"):
        run(_cfg(f"run_dir={tmp_path}", f"outputs={path}"))


def test_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat")
    nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient")
    pytest.importorskip("ipykernel", reason="notebook tests need ipykernel (a python3 kernel)")
    pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib")
    path = REPO / "notebooks" / "ursla.ipynb"
    for cell in json.loads(path.read_text())["cells"]:
        assert not cell.get("outputs") and not cell.get("execution_count")  # committed stripped
    nb = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources=resources).execute()
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "reading=prefix" in text and "reading=length" in text and "image/png" in text
