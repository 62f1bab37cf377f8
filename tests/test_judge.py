"""Reward-model judge: loading, formatting, batch-invariant scoring, win rates.

Run: .venv/bin/pytest -q tests/test_judge.py
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import save_tiny_rm
from tokenizers import processors

from prefopt.eval.judge import encode, load_reward_model, score, win_rates
from prefopt.model.load import tiny_tokenizer

PROMPTS = [
    "hi",
    "Write a haiku about gradient descent, please.",
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ],
    "x",
    "Explain the Bradley-Terry model in one sentence.",
]
RESPONSES = [
    "hello",
    "Steps fall downhill / loss curves bend",
    "6",
    "a much longer answer " * 6,
    "ok",
]


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    save_tiny_rm(path)
    return load_reward_model(str(path))


def test_load_and_score(rm):
    model, tok = rm
    assert not model.training and model.config.num_labels == 1
    scores = score(model, tok, PROMPTS, RESPONSES)
    assert len(scores) == len(PROMPTS) and all(math.isfinite(s) for s in scores)
    assert len(set(scores)) == len(scores)  # a random RM still tells different inputs apart
    # The score is the head's output at the last token of exactly the ids `encode` produces.
    ids = torch.tensor([encode(tok, PROMPTS[1], RESPONSES[1])])
    with torch.no_grad():
        last = model.score(model.model(input_ids=ids).last_hidden_state[:, -1])  # (1, 1)
    assert scores[1] == pytest.approx(float(last[0, 0]), abs=1e-5)


def test_scores_do_not_depend_on_batching(rm, monkeypatch):
    model, tok = rm
    # score pads on the right on its own; a left-padding tokenizer must not change that.
    monkeypatch.setattr(tok, "padding_side", "left")
    alone = [score(model, tok, [p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    lengths = {len(encode(tok, p, r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)}
    assert len(lengths) == len(PROMPTS)  # mixed lengths, so batches are padded
    for batch_size in (2, 5):
        batched = score(model, tok, PROMPTS, RESPONSES, batch_size=batch_size)
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_rm_without_pad_token_gets_one(tmp_path):
    save_tiny_rm(tmp_path, with_pad=False)
    model, tok = load_reward_model(str(tmp_path))
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id
    alone = [score(model, tok, [p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    torch.testing.assert_close(score(model, tok, PROMPTS, RESPONSES), alone, rtol=0, atol=1e-5)


def test_num_labels_other_than_one_is_rejected(tmp_path):
    save_tiny_rm(tmp_path, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        load_reward_model(str(tmp_path))


def test_encode_has_exactly_one_bos():
    tok = tiny_tokenizer()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    expected = tok.apply_chat_template(chat, tokenize=False)
    assert expected.startswith("<s>")
    bos = tok.bos_token_id
    ids = encode(tok, "hi", "yo")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.decode(ids) == expected
    # A tokenizer that adds BOS itself: with the template writing BOS too, still one.
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    assert encode(tok, "hi", "yo") == ids
    # ... and with a template that writes none, the tokenizer's BOS is kept.
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    assert encode(tok, "hi", "yo") == ids


def test_encode_without_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    assert tok.decode(encode(tok, "Question?", "Answer.")) == "Question?\n\nAnswer."


def test_truncation_keeps_bos_and_the_end_of_the_response():
    tok = tiny_tokenizer()
    full = encode(tok, "a long prompt " * 20, "the response ends here")
    ids = encode(tok, "a long prompt " * 20, "the response ends here", max_length=40)
    assert len(full) > 40 and len(ids) == 40
    assert ids[0] == tok.bos_token_id and ids[1:] == full[-39:]
    assert tok.decode(ids).endswith("the response ends here<|im_end|>\n")


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_equal_scores_are_an_even_match():
    out = win_rates([0.3, -1.0, 2.0], [0.3, -1.0, 2.0], [10, 20, 30], [30, 10, 5])
    assert out["win_rate"] == pytest.approx(50) and out["lc_win_rate"] == pytest.approx(50)
    assert out["discrete_win_rate"] == 50 and (out["wins"], out["ties"], out["losses"]) == (0, 3, 0)


def test_constant_margin_without_length_difference():
    margin = 0.7
    out = win_rates([1.0 + margin] * 4, [1.0] * 4, [12] * 4, [12] * 4)
    assert out["win_rate"] == pytest.approx(100 * _sigmoid(margin))
    assert out["lc_win_rate"] == pytest.approx(100 * _sigmoid(margin)) and out["lc_phi"] == 0


def test_constant_margin_with_varied_lengths_is_not_length_controlled_away():
    margin = 0.7
    lengths = [100, 250, 40, 300, 80, 120]
    out = win_rates([margin] * 6, [0.0] * 6, lengths, [150] * 6)
    assert out["lc_win_rate"] == pytest.approx(100 * _sigmoid(margin), abs=1e-3)
    assert out["lc_phi"] == pytest.approx(0, abs=1e-3)


def test_wins_explained_by_length_are_controlled_away():
    # The model is longer on 3 of 4 prompts and the RM prefers longer outputs, by c * tanh(z):
    # the raw win rate favours the model; with the length difference held at 0 it is a draw.
    dlen = [200.0, 150.0, 100.0, 50.0, 120.0, 180.0, -150.0, -100.0]
    std = statistics.stdev(dlen)  # sample std, as AlpacaEval
    c = 2.0
    margins = [c * math.tanh(d / std) for d in dlen]
    base_lengths = [300.0] * len(dlen)
    out = win_rates(margins, [0.0] * len(dlen), [300 + d for d in dlen], base_lengths)
    assert out["win_rate"] > 60
    assert out["lc_win_rate"] == pytest.approx(50, abs=0.05)
    assert out["lc_phi"] == pytest.approx(c, rel=1e-2)
    assert out["avg_length"] == pytest.approx(300 + sum(dlen) / len(dlen))


def test_discrete_counts():
    out = win_rates([2.0, 1.0, 0.0, -1.0, 5.0], [1.0, 1.0, 1.0, 1.0, 0.0], [1] * 5, [2] * 5)
    assert (out["n"], out["wins"], out["ties"], out["losses"]) == (5, 2, 1, 2)
    assert out["discrete_win_rate"] == pytest.approx(100 * 2.5 / 5)
    expected = [_sigmoid(m) for m in (1.0, 0.0, -1.0, -2.0, 5.0)]
    assert out["win_rate"] == pytest.approx(100 * sum(expected) / 5)
    assert out["avg_length"] == 1 and out["baseline_avg_length"] == 2


def test_mismatched_or_empty_inputs_are_rejected():
    with pytest.raises(ValueError, match="mismatched"):
        win_rates([1.0, 2.0], [1.0], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="mismatched"):
        win_rates([1.0], [1.0], [1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        win_rates([], [], [], [])
