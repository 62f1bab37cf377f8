"""URSLA measurement of the REFA paper (§6.3, App. F, Table 2): average per-token NLL vs length.

    python -m prefopt.eval.ursla                                    # SmolLM2-135M, shipped dataset
    python -m prefopt.eval.ursla model=tiny dataset.max_train_examples=8 lengths=[1,5,10,20]
    python -m prefopt.eval.ursla model=mistral7b outputs=path/to/model_outputs.json device=cuda
    python -m prefopt.eval.ursla responses=best reading=length window=5 lengths=[5,15,25]

URSLA (Conjecture 1 = Conjecture 2) says that for some responses the average per-token negative
log-probability ``LP̄(y) = -(1/len(y)) Σ_t log π(y_t | x, y_<t)`` (Eq. 25) falls as ``len(y)``
grows. Table 2 reports ``LP̄(y)_L`` at L = 1, 201, 401, 801, 1001 (alpaca, mistral-7b:
0.493 0.391 0.373 0.344 0.336) without saying what the index L is. Two readings:

- ``reading=prefix`` (default): ``LP̄_L`` = mean over the responses with at least L tokens of the
  mean NLL of their first L tokens. One response set fills every column, the L = 1 column is
  well populated (every response has a first token, whereas few responses are one token long),
  and it measures App. F's rationale directly (once committed to a trajectory, the model predicts
  later tokens more easily). Each column averages a different subset (the long responses), so
  counts are reported.
- ``reading=length``: responses are bucketed by their own length n, ``L - window <= n <
  L + window``, and each bucket averages whole-response ``LP̄(y)``. With the default window of 100
  the paper's columns tile 1-100, 101-300, 301-500, 701-900, 901-1100 tokens; wider windows let
  buckets overlap (a response then counts in several columns).

Both average per response (the paper's "expected value of LP̄(y)"), not per token. Responses are
scored as training scores them: the prompt through the model's chat template, the response as text
plus one EOS (``prefopt.data.tokenize``); the EOS token is not scored unless ``include_eos=true``
(it is then counted in the length). Conjecture 2 is about responses the model generated itself:
pass an AlpacaEval ``model_outputs.json`` (``outputs=``) for that; otherwise the ``dataset``
group's responses are used (``responses=all|best``). Writes ``<run_dir>/ursla.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import prefopt.eval.constraints.schema  # noqa: F401  (dataset.schema=constraints_reference)
from prefopt.checks import typed
from prefopt.config import DatasetConfig, ModelConfig
from prefopt.data.example import DataError, Message
from prefopt.data.loading import iter_rows
from prefopt.data.schemas import ParseOptions, parse_row
from prefopt.data.tokenize import TokenizeOptions, Tokenizer
from prefopt.model.load import load_model, load_tokenizer
from prefopt.model.logprobs import token_logps

log = logging.getLogger(__name__)
PAPER_LENGTHS = (1, 201, 401, 801, 1001)
PAPER_VALUES = (0.493, 0.391, 0.373, 0.344, 0.336)  # Table 2, alpaca, mistral-7b
READINGS = ("prefix", "length")


@dataclass
class UrslaConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    outputs: str | None = None  # AlpacaEval model_outputs.json; replaces the dataset when set
    split: str = "train"  # dataset rows: train (dataset.path) | eval (dataset.eval_path)
    responses: str = "all"  # dataset only: all (every response) | best (highest score per prompt)
    reading: str = "prefix"  # prefix | length (see the module docstring)
    lengths: list[int] = field(default_factory=lambda: list(PAPER_LENGTHS))
    window: int = 100  # reading=length: bucket L holds responses with L-window <= n < L+window
    include_eos: bool = False  # score (and count) the EOS token that ends each response
    max_examples: int | None = None  # prompts; None: dataset.max_{train,eval}_examples
    batch_size: int = 4  # sequences per forward (right-padded, sorted by length)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # weights: auto (model.dtype) | float32 | bfloat16 | float16
    seed: int = 0  # the tiny model's init
    num_threads: int = 0  # torch CPU threads; 0 = torch's default (1 suits model=tiny)
    run_dir: str = MISSING
    cache_dir: str = MISSING


ConfigStore.instance().store(name="_ursla_schema", node=UrslaConfig)


def in_bucket(n: int, L: int, window: int) -> bool:
    """reading=length: does a response of n tokens belong to column L (half-open window)."""
    return L - window <= n < L + window


def _as_messages(prompt: str | list[Message]) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@torch.no_grad()
def token_nlls(
    model: PreTrainedModel,
    seqs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 4,
    chunk_size: int = 1024,
) -> list[list[float]]:
    """Per-token NLL of each (prompt_ids, target_ids) pair's targets, from plain forwards of
    prompt + targets, in input order. Log-softmax is fp32 and only at target positions."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    pad = model.config.pad_token_id or 0
    order = sorted(range(len(seqs)), key=lambda i: -sum(map(len, seqs[i])))  # little padding
    out: list[list[float]] = [[] for _ in seqs]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)  # positions holding a target token
        for r, i in enumerate(rows):
            p, t = seqs[i]
            ids[r, : len(p) + len(t)] = torch.tensor(p + t)
            attn[r, : len(p) + len(t)] = 1
            target[r, len(p) : len(p) + len(t)] = True
        ids, attn, target = ids.to(device), attn.to(device), target.to(device)
        hidden = model.get_decoder()(
            input_ids=ids, attention_mask=attn, use_cache=False
        ).last_hidden_state  # (N, T, H)
        mask = target[:, 1:]  # position t predicts token t + 1
        nll = -token_logps(hidden[:, :-1][mask], ids[:, 1:][mask], head, chunk_size, softcap)
        for i, chunk in zip(rows, nll.split(mask.sum(1).tolist()), strict=True):
            out[i] = chunk.double().tolist()
    return out


def aggregate(
    nlls: Sequence[Sequence[float]],
    n_tokens: Sequence[int],
    lengths: Sequence[int],
    reading: str = "prefix",
    window: int = 100,
) -> list[dict[str, Any]]:
    """One column per L: ``value`` (mean LP̄ over contributing responses, None when there are
    none), ``count``, ``stderr``, ``note``. ``n_tokens[i]`` is response i's full scored length;
    ``nlls[i]`` needs its first ``max(lengths)`` tokens (prefix) or all of them (length, only for
    responses in some bucket; others may be empty)."""
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    columns = []
    for L in lengths:
        if reading == "prefix":
            lps = [sum(x[:L]) / L for x, n in zip(nlls, n_tokens, strict=True) if n >= L]
            where = f"no response has >= {L} tokens"
        else:
            lps = [
                sum(x) / n
                for x, n in zip(nlls, n_tokens, strict=True)
                if n and in_bucket(n, L, window)
            ]
            where = f"no response has {max(L - window, 1)} to {L + window - 1} tokens"
        value = math.fsum(lps) / len(lps) if lps else None
        var = math.fsum((v - value) ** 2 for v in lps) / (len(lps) - 1) if len(lps) > 1 else 0.0
        columns.append(
            {
                "length": L,
                "value": value,
                "count": len(lps),
                "stderr": math.sqrt(var / len(lps)) if lps else None,
                "note": "" if lps else where,
            }
        )
    return columns


def measure(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[Message]],
    responses: Sequence[str],
    lengths: Sequence[int] = PAPER_LENGTHS,
    reading: str = "prefix",
    *,
    window: int = 100,
    include_eos: bool = False,
    batch_size: int = 4,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """LP̄ at each L for ``responses[i]`` answering ``prompts[i]`` (text or chat messages).

    Returns ``{"reading", "lengths", "values", "counts", "columns", "n_responses",
    "response_tokens"}`` with ``columns`` as in :func:`aggregate`.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    enc = Tokenizer(tok, TokenizeOptions(system_prompt=system_prompt))
    prompt_cache: dict[str, list[int]] = {}  # K responses share one prompt
    seqs = []
    for prompt, text in zip(prompts, responses, strict=True):
        msgs = _as_messages(prompt)
        key = json.dumps(msgs)
        if key not in prompt_cache:
            prompt_cache[key] = enc.prompt_ids(msgs)
        ids = enc.response_ids(text)
        seqs.append((prompt_cache[key], ids if include_eos else ids[:-1]))
    n_tokens = [len(t) for _, t in seqs]
    # Causal: the first max(L) NLLs do not depend on later tokens, so prefix scores only those;
    # length needs whole responses, but only the ones that fall in some bucket.
    if reading == "prefix":
        todo = [i for i, n in enumerate(n_tokens) if n]
        cut = max(lengths)
    else:
        todo = [
            i for i, n in enumerate(n_tokens) if n and any(in_bucket(n, L, window) for L in lengths)
        ]
        cut = max(n_tokens, default=0)
    scored = token_nlls(model, [(seqs[i][0], seqs[i][1][:cut]) for i in todo], batch_size)
    nlls: list[list[float]] = [[] for _ in seqs]
    for i, x in zip(todo, scored, strict=True):
        nlls[i] = x
    columns = aggregate(nlls, n_tokens, lengths, reading, window)
    return {
        "reading": reading,
        "lengths": list(lengths),
        "values": [c["value"] for c in columns],
        "counts": [c["count"] for c in columns],
        "columns": columns,
        "n_responses": len(seqs),
        "response_tokens": {
            "min": min(n_tokens, default=0),
            "max": max(n_tokens, default=0),
            "mean": sum(n_tokens) / max(len(n_tokens), 1),
        },
    }


def format_table(result: dict[str, Any], dataset: str, model: str) -> str:
    """Table 2's layout: one row, LP̄ at each L, with the responses behind each value."""
    heads = [f"LP(y)_{L}" for L in result["lengths"]]
    cells = [
        f"{c['value']:.3f} (n={c['count']})" if c["count"] else "- (n=0)" for c in result["columns"]
    ]
    widths = [max(len(h), len(c)) for h, c in zip(heads, cells, strict=True)]
    lead = [("Dataset", dataset), ("Model", model)]
    lw = [max(len(a), len(b)) for a, b in lead]

    def row(xs: list[str], ws: list[int]) -> str:
        return " | ".join(x.ljust(w) for x, w in zip(xs, ws, strict=True))

    lines = [
        f"Average per-token negative log-probability (reading={result['reading']})",
        row([a for a, _ in lead] + heads, lw + widths),
        "-+-".join("-" * w for w in lw + widths),
        row([b for _, b in lead] + cells, lw + widths),
    ]
    lines += [f"note: L={c['length']}: {c['note']}" for c in result["columns"] if c["note"]]
    return "\n".join(lines)


def load_outputs(path: str, limit: int | None) -> tuple[list[str], list[str], list[str]]:
    """Instructions, outputs and generators of an AlpacaEval ``model_outputs.json``."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of {{instruction, output, ...}}")
    prompts, texts, generators = [], [], []
    for i, row in enumerate(rows[:limit]):
        for key in ("instruction", "output"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise DataError(f"{path} entry {i}: key {key!r} must be a string")
        prompts.append(row["instruction"])
        texts.append(row["output"])
        generators.append(str(row.get("generator", "")))
    return prompts, texts, generators


def load_dataset_responses(cfg: UrslaConfig) -> tuple[list[list[Message]], list[str]]:
    """(prompt, response) pairs of the dataset group's rows: every response, or the best."""
    d = cfg.dataset
    if cfg.split == "train":
        path, split, limit = d.path, d.train_split, d.max_train_examples
    elif cfg.split == "eval" and (d.eval_path or d.eval_split):
        path, split, limit = d.eval_path or d.path, d.eval_split or "train", d.max_eval_examples
    else:
        raise ValueError("split must be train, or eval with dataset.eval_path or eval_split set")
    if cfg.responses not in ("all", "best"):
        raise ValueError(f"responses must be all or best, got {cfg.responses!r}")
    limit = cfg.max_examples if cfg.max_examples is not None else limit
    opts, prompts, texts = ParseOptions(score_field=d.score_field), [], []
    for n, (where, row) in enumerate(iter_rows(path, split)):
        if limit is not None and n >= limit:
            break
        try:
            ex = parse_row(d.schema, row, where, opts)
        except DataError:
            if d.bad_rows == "error":
                raise
            continue
        keep = range(len(ex.responses))
        if cfg.responses == "best":  # the first of tied best scores
            keep = [max(keep, key=lambda k: (ex.scores[k], -k))]
        prompts += [ex.prompt] * len(keep)
        texts += [ex.responses[k] for k in keep]
    return prompts, texts


def run(composed: DictConfig) -> dict[str, Any]:
    cfg = typed(composed, UrslaConfig)  # the typed config from here on
    if cfg.dtype != "auto":
        cfg.model.dtype = cfg.dtype
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = "cpu" if device == "auto" else device
    generators: list[str] = []
    if cfg.outputs:
        prompts, texts, generators = load_outputs(cfg.outputs, cfg.max_examples)
        source = cfg.outputs
    else:
        prompts, texts = load_dataset_responses(cfg)
        source = f"{cfg.dataset.path} ({cfg.split}, responses={cfg.responses})"
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tok, cfg.seed).to(device).eval()
    log.info("scoring %d responses from %s on %s", len(texts), source, device)
    result = measure(
        model,
        tok,
        prompts,
        texts,
        cfg.lengths,
        cfg.reading,
        window=cfg.window,
        include_eos=cfg.include_eos,
        batch_size=cfg.batch_size,
        system_prompt=cfg.dataset.system_prompt,
    )
    result |= {
        "model": cfg.model.name_or_path,
        "source": source,
        "generators": sorted(set(generators)),
        "paper": {"lengths": list(PAPER_LENGTHS), "values": list(PAPER_VALUES)},
        "settings": {
            k: getattr(cfg, k)
            for k in (
                "window",
                "include_eos",
                "split",
                "responses",
                "max_examples",
                "batch_size",
                "seed",
            )
        }
        | {"dtype": cfg.model.dtype, "device": device},
    }
    name = "alpaca_eval" if cfg.outputs else Path(cfg.dataset.path).stem
    print(format_table(result, name, cfg.model.name_or_path))
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.run_dir, "ursla.json").write_text(json.dumps(result, indent=2))
    log.info("wrote %s", Path(cfg.run_dir, "ursla.json"))
    return result


@hydra.main(config_path="../../conf", config_name="ursla", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
