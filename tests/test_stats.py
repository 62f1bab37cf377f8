# .venv/bin/pytest tests/test_stats.py -q
"""group_stats (chunked, response tokens only) against a naive full-logits computation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import naive_stats
from omegaconf import OmegaConf

from prefopt.config import ModelConfig
from prefopt.data.collate import collate
from prefopt.data.tokenize import TokenizedGroup
from prefopt.model.load import load_model
from prefopt.model.logprobs import group_stats, token_logps


@pytest.fixture(scope="module")
def model(tok):
    cfg = OmegaConf.structured(
        ModelConfig(name_or_path="tiny", source="tiny", attn_implementation="eager")
    )
    return load_model(cfg, "/nonexistent", tok, seed=0).double()


def groups(tok) -> list[tuple[TokenizedGroup, tuple[int, ...]]]:
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 250, (n,), generator=g).tolist()

    eos = tok.eos_token_id
    a = TokenizedGroup(
        [tok.bos_token_id, *ids(5)],
        [ids(3) + [eos], ids(7) + [eos], ids(2)],
        [True, True, False],
        [1.0, 2.0, 0.0],
    )
    b = TokenizedGroup(
        [tok.bos_token_id, *ids(9)], [ids(1) + [eos], ids(4) + [eos]], [True, True], [3.0, 1.0]
    )
    return [(a, (0, 1, 2)), (b, (0, 1))]


def test_chunked_stats_match_naive_full_logits(model, tok):
    grps = groups(tok)
    batch = collate(grps, tok.pad_token_id)
    stats = group_stats(model, batch, chunk_size=3)  # chunks straddle rows on purpose
    logps, lengths, last = naive_stats(model, grps)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(stats.mask, mask)
    torch.testing.assert_close(stats.logps[mask], logps[mask], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.lengths.double(), lengths)
    torch.testing.assert_close(stats.eos_logps[mask], last[mask], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        stats.has_eos, torch.tensor([[True, True, False], [True, True, False]])
    )
    # empty slot: finite filler, length 1 (so avg_logps stays finite)
    assert stats.logps[1, 2] == 0 and stats.lengths[1, 2] == 1


def test_chunked_gradients_match_naive(model, tok):
    grps = groups(tok)
    batch = collate(grps, tok.pad_token_id)
    weights = torch.tensor([[0.3, -1.2, 0.7], [2.0, -0.5, 0.0]], dtype=torch.float64)
    model.zero_grad()
    (group_stats(model, batch, chunk_size=4).logps * weights).sum().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logps, _, _ = naive_stats(model, grps)
    (logps * weights).sum().backward()
    for a, p in zip(chunked, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-10)


def test_one_k_way_forward_equals_separate_forwards(model, tok):
    grps = groups(tok)
    together = group_stats(model, collate(grps, tok.pad_token_id), chunk_size=1024)
    for b, (g, idx) in enumerate(grps):
        for k, r in enumerate(idx):
            alone = group_stats(model, collate([(g, (r,))], tok.pad_token_id))
            torch.testing.assert_close(
                together.logps[b, k], alone.logps[0, 0], rtol=1e-9, atol=1e-9
            )


def test_token_logps_chunk_size_does_not_change_values():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False).double()
    hidden = torch.randn(10, 8, dtype=torch.float64)
    targets = torch.randint(0, 11, (10,))
    full = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    for c in (1, 3, 10, 64):
        torch.testing.assert_close(token_logps(hidden, targets, head, c), full)
    capped = token_logps(hidden, targets, head, 4, softcap=2.0)
    logits = 2.0 * torch.tanh(head(hidden) / 2.0)
    torch.testing.assert_close(
        capped, logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    )


def test_sequence_kl_matches_naive_full_vocabulary_kl(model, tok):
    from prefopt.model.logprobs import sequence_kl

    ref = copy.deepcopy(model).requires_grad_(False)
    assert torch.all(sequence_kl(model, ref, collate(groups(tok), tok.pad_token_id)).abs() < 1e-12)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grps = groups(tok)
    batch = collate(grps, tok.pad_token_id)
    model.zero_grad()
    kl = sequence_kl(model, ref, batch, chunk_size=3)
    kl.sum().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    naive = []
    for g, idx in grps:
        for r in idx:
            seq = torch.tensor([g.prompt_ids + g.response_ids[r]])
            lp = model(input_ids=seq).logits[0].log_softmax(-1)
            lq = ref(input_ids=seq).logits[0].log_softmax(-1)
            P = len(g.prompt_ids)
            naive.append(
                sum((lp[t].exp() * (lp[t] - lq[t])).sum() for t in range(P - 1, seq.shape[1] - 1))
            )
    naive = torch.stack(naive)
    torch.testing.assert_close(kl, naive, rtol=1e-9, atol=1e-12)
    assert torch.all(kl > 0)
    naive.sum().backward()
    for a, p in zip(chunked, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-10)
