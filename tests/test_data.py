# .venv/bin/pytest tests/test_data.py -q
"""Tokenization conventions, truncation, pair views, the resumable order, loading and caching."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_rows, write_jsonl

from prefopt.data.collate import collate, view_order, views_at
from prefopt.data.example import DataError, Example
from prefopt.data.loading import load_tokenized, make_views
from prefopt.data.schemas import ParseOptions
from prefopt.data.tokenize import TokenizedGroup, TokenizeOptions, Tokenizer

EX = Example([{"role": "user", "content": "Hi there"}], ["Hello!", "Go away"], [2.0, 1.0], "x")


def test_prompt_has_one_bos_and_each_response_one_final_eos(tok):
    g = Tokenizer(tok, TokenizeOptions())(EX, "row 0")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert g.prompt_ids[0] == bos and g.prompt_ids.count(bos) == 1
    assert tok.decode(g.prompt_ids).endswith("<|im_start|>assistant\n")
    for ids, text in zip(g.response_ids, EX.responses, strict=True):
        assert ids[-1] == eos and ids.count(eos) == 1
        assert tok.decode(ids[:-1]) == text
    assert g.has_eos == [True, True]


def test_bos_never_doubled_when_tokenizer_adds_one_and_template_writes_one(tok, monkeypatch):
    t = Tokenizer(tok, TokenizeOptions())
    t.add_bos = True  # as for tokenizers that prepend BOS on encode (Llama, Mistral)
    ids = t.prompt_ids(EX.prompt)
    assert ids[:2] != [tok.bos_token_id] * 2 and ids.count(tok.bos_token_id) == 1


def test_literal_eos_text_in_response_is_not_an_eos_token(tok):
    ex = Example(EX.prompt, ["a <|im_end|> b", "ok<|im_end|>"], [1.0, 0.0])
    g = Tokenizer(tok, TokenizeOptions())(ex, "row 0")
    assert g.response_ids[0].count(tok.eos_token_id) == 1  # only the appended one
    assert g.response_ids[1] == Tokenizer(tok, TokenizeOptions()).response_ids("ok")  # stripped


def test_system_prompt_is_prepended(tok):
    g = Tokenizer(tok, TokenizeOptions(system_prompt="Be brief."))(EX, "row 0")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tok.decode(g.prompt_ids)


def test_truncation_keeps_prompt_end_and_cuts_response_end(tok):
    long = Example([{"role": "user", "content": "x" * 100 + "END"}], ["y" * 50, "ok"], [1.0, 0.0])
    t = Tokenizer(tok, TokenizeOptions(max_length=60, max_prompt_length=40))
    g = t(long, "row 3")
    assert len(g.prompt_ids) == 40 and g.prompt_ids[0] == tok.bos_token_id
    assert "END" in tok.decode(g.prompt_ids)  # the end of the prompt is kept
    assert len(g.prompt_ids) + len(g.response_ids[0]) == 60
    assert g.has_eos == [False, True]  # the cut response lost its EOS
    assert t.counts == Counter({"truncated_prompts": 1, "truncated_responses": 1, "groups": 1})


@pytest.mark.parametrize(
    ("opts", "key"),
    [
        (
            TokenizeOptions(max_length=60, max_prompt_length=40, prompt_truncation="error"),
            "'prompt'",
        ),
        (
            TokenizeOptions(max_length=200, max_prompt_length=150, response_truncation="error"),
            "'responses'\\[0\\]",
        ),
    ],
)
def test_truncation_error_names_row_and_key(tok, opts, key):
    long = Example([{"role": "user", "content": "x" * 100}], ["y" * 150, "ok"], [1.0, 0.0])
    with pytest.raises(DataError, match=f"^data.jsonl line 7: key {key}"):
        Tokenizer(tok, opts)(long, "data.jsonl line 7")


def test_truncation_skip_is_counted(tok):
    long = Example([{"role": "user", "content": "x" * 100}], ["y", "ok"], [1.0, 0.0])
    t = Tokenizer(
        tok, TokenizeOptions(max_length=60, max_prompt_length=40, prompt_truncation="skip")
    )
    assert t(long, "row 0") is None and t.counts["skipped_long_prompt"] == 1


def _data(tmp_path: Path, rows: list[dict], tok, cache: str | None = None, bad_rows: str = "error"):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return load_tokenized(
        str(path),
        "train",
        "canonical",
        ParseOptions(),
        Tokenizer(tok, TokenizeOptions()),
        cache,
        bad_rows,
    )


def test_pair_views_order_by_score(tmp_path, tok):
    rows = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [2, 5, 5, 1]}]
    data, _ = _data(tmp_path, rows, tok)
    assert make_views(data, None) == [(0, (0, 1, 2, 3))]
    assert make_views(data, "best_vs_worst") == [(0, (1, 3))]
    assert make_views(data, "best_vs_each") == [(0, (1, 0)), (0, (1, 3))]  # tie 5 vs 5 dropped
    assert sorted(make_views(data, "all_pairs")) == sorted(
        [(0, (1, 0)), (0, (1, 3)), (0, (2, 0)), (0, (2, 3)), (0, (0, 3))]
    )
    with pytest.raises(ValueError, match="dataset.pairs"):
        make_views(data, "random")


def test_bad_row_error_names_file_line_and_key(tmp_path, tok):
    rows = arithmetic_rows(3, seed=0)
    rows[1]["scores"][2] = float("nan")
    with pytest.raises(DataError, match=r"d\.jsonl line 2: key 'scores'\[2\]"):
        _data(tmp_path, rows, tok)


def test_invalid_json_names_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(arithmetic_rows(1, 0)[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 2: invalid JSON"):
        load_tokenized(
            str(path),
            "train",
            "canonical",
            ParseOptions(),
            Tokenizer(tok, TokenizeOptions()),
            None,
            "error",
        )


def test_bad_rows_skip_policy_counts_and_logs(tmp_path, tok, caplog):
    rows = arithmetic_rows(5, seed=0)
    rows[0]["responses"] = rows[0]["responses"][:1]  # K = 1
    rows[0]["scores"] = rows[0]["scores"][:1]
    rows[3]["responses"][1] = "  "  # empty response
    with caplog.at_level(logging.WARNING):
        data, counts = _data(tmp_path, rows, tok, bad_rows="skip")
    assert len(data) == 3 and counts["skipped_bad_rows"] == 2
    assert "line 1" in caplog.text and "line 4" in caplog.text


def test_cache_is_reused_and_invalidated_by_content(tmp_path, tok):
    cache = str(tmp_path / "cache")
    rows = arithmetic_rows(4, seed=0)
    first, _ = _data(tmp_path, rows, tok, cache)
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1
    again, _ = _data(tmp_path, rows, tok, cache)
    assert again["prompt_ids"] == first["prompt_ids"]
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1  # reused
    rows[0]["responses"][0] = "changed"
    changed, _ = _data(tmp_path, rows, tok, cache)
    assert changed["response_ids"] != first["response_ids"]  # new content -> new cache entry
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


def test_collate_masks_prompt_and_padding():
    g1 = TokenizedGroup([1, 10, 11], [[20, 3], [21, 22, 3]], [True, True], [1.0, 0.0])
    g2 = TokenizedGroup([1, 12], [[23, 3], [24, 3], [25, 3]], [True, True, True], [0.0, 1.0, 2.0])
    b = collate([(g1, (0, 1)), (g2, (2, 0, 1))], pad_id=0)
    assert b.input_ids.shape == (5, 6)
    assert b.input_ids[1].tolist() == [1, 10, 11, 21, 22, 3]
    assert b.response_mask[1].tolist() == [False, False, False, True, True, True]
    assert b.attention_mask[0].tolist() == [True] * 5 + [False]
    assert b.scores.tolist() == [[1.0, 0.0, 0.0], [2.0, 0.0, 1.0]]
    assert b.mask.tolist() == [[True, True, False], [True, True, True]]
    assert b.row_group.tolist() == [0, 0, 1, 1, 1] and b.row_slot.tolist() == [0, 1, 0, 1, 2]


def test_view_stream_is_deterministic_and_resumable():
    n = 7
    assert sorted(view_order(n, seed=3, epoch=0)) == list(range(n))
    assert view_order(n, 3, 0) != view_order(n, 3, 1)  # reshuffled per epoch
    whole = views_at(n, 3, 0, 20)
    assert whole == views_at(n, 3, 0, 8) + views_at(n, 3, 8, 12)  # resume = continue exactly
    assert torch.tensor(whole[:7]).sort().values.tolist() == list(range(7))
