"""Read a source (local file or Hub id), parse rows, tokenize, cache; build group views.

Local files are read row by row so an error names the file and line. Tokenized data is cached as
an Arrow dataset under ``<cache_dir>/tokenized/<key>``; the key hashes the source (file content or
Hub id + split + revision), the schema options, the tokenizer fingerprint and the tokenize options,
so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import datasets

from prefopt.atomic import publish_dir
from prefopt.data.example import DataError
from prefopt.data.schemas import ParseOptions, parse_row
from prefopt.data.tokenize import (
    TokenizedGroup,
    Tokenizer,
    options_key,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)
datasets.disable_progress_bars()  # one bar per cache write drowns the training log
CACHE_VERSION = "1"
PAIR_MODES = ("best_vs_worst", "best_vs_each", "all_pairs")
View = tuple[int, tuple[int, ...]]  # (row of the tokenized dataset, response indices)


class DataSplits(NamedTuple):
    train: datasets.Dataset
    train_views: list[View]
    eval: datasets.Dataset
    eval_views: list[View]
    counts: Counter[str]


def _is_local(path: str) -> bool:
    return os.path.exists(path) or path.endswith((".jsonl", ".json", ".parquet"))


def iter_rows(path: str, split: str) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) with ``where`` naming file and line, or Hub id, split and row."""
    if _is_local(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file {path} does not exist")
        if path.endswith(".parquet"):
            table = datasets.Dataset.from_parquet(path)
            for i, row in enumerate(table):
                yield f"{path} row {i}", row
            return
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
        return
    for i, row in enumerate(datasets.load_dataset(path, split=split)):
        yield f"{path} split {split} row {i}", row


def _source_key(path: str, split: str) -> str:
    if _is_local(path) and os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return f"hub:{path}:{split}"


def load_tokenized(
    path: str,
    split: str,
    schema: str,
    parse_opts: ParseOptions,
    tokenizer: Tokenizer,
    cache_dir: str | None,
    bad_rows: str,
    max_examples: int | None = None,
) -> tuple[datasets.Dataset, Counter[str]]:
    """The tokenized groups of one split (Arrow, lazily indexed) and the counts of what happened."""
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"dataset.bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    key = hashlib.sha256(
        "\x00".join(
            [
                CACHE_VERSION,
                _source_key(path, split),
                schema,
                repr(parse_opts),
                bad_rows,
                str(max_examples),
                tokenizer_fingerprint(tokenizer.tok),
                options_key(tokenizer.opts),
            ]
        ).encode()
    ).hexdigest()[:20]
    target = Path(cache_dir, "tokenized", key) if cache_dir else None
    if target is not None and (target / "counts.json").is_file():
        counts = Counter(json.loads((target / "counts.json").read_text()))
        return datasets.load_from_disk(str(target / "data")), counts
    columns: dict[str, list] = {
        k: [] for k in ("prompt_ids", "response_ids", "has_eos", "scores", "id")
    }
    counts: Counter[str] = Counter()
    for where, row in itertools.islice(iter_rows(path, split), max_examples):
        try:
            group = tokenizer(parse_row(schema, row, where, parse_opts), where)
        except DataError as e:
            if bad_rows == "error":
                raise
            counts["skipped_bad_rows"] += 1
            if counts["skipped_bad_rows"] <= 5:
                log.warning("skipping bad row: %s", e)
            continue
        if group is not None:
            for k in columns:
                columns[k].append(getattr(group, k))
    counts.update(tokenizer.counts)
    tokenizer.counts.clear()
    if not columns["id"]:
        raise DataError(f"{path} ({split}): no usable rows ({dict(counts)})")
    data = datasets.Dataset.from_dict(columns)
    if target is not None:
        tmp = target.with_name(f".tmp-{key}-{os.getpid()}")
        data.save_to_disk(str(tmp / "data"))
        (tmp / "counts.json").write_text(json.dumps(counts))
        publish_dir(tmp, target)  # every rank tokenizes; the first to finish publishes
        data = datasets.load_from_disk(str(target / "data"))
    return data, counts


def group_at(data: datasets.Dataset, i: int) -> TokenizedGroup:
    return TokenizedGroup(**data[i])


def make_views(data: datasets.Dataset, pairs: str | None) -> list[View]:
    """Index views of the groups: all responses (pairs=None) or score-ordered pairs.

    best_vs_worst: one pair per group; best_vs_each: the best against every lower-scored response;
    all_pairs: every pair with distinct scores. Pairs list the higher-scored response first.
    """
    scores = data["scores"]
    if pairs is None:
        return [(i, tuple(range(len(s)))) for i, s in enumerate(scores)]
    if pairs not in PAIR_MODES:
        raise ValueError(f"dataset.pairs must be one of {PAIR_MODES}, got {pairs!r}")
    views: list[View] = []
    for i, s in enumerate(scores):
        order = sorted(range(len(s)), key=lambda k: -s[k])  # stable: first index wins ties
        if pairs == "best_vs_worst":
            views.append((i, (order[0], order[-1])))
        elif pairs == "best_vs_each":
            views.extend((i, (order[0], k)) for k in order[1:] if s[k] < s[order[0]])
        else:
            views.extend((i, (a, b)) for a, b in itertools.combinations(order, 2) if s[a] > s[b])
    return views


def build_splits(
    cfg, tokenizer: Tokenizer, cache_dir: str | None, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset, Counter[str]]:
    """Train and eval tokenized groups for a ``DatasetConfig``, with merged counts.

    Eval comes from ``eval_path``, else ``eval_split`` of ``path``, else ``eval_size`` rows held
    out of train with a fixed seed.
    """
    parse = ParseOptions(score_field=cfg.score_field)

    def load(path: str, split: str, limit: int | None) -> tuple[datasets.Dataset, Counter[str]]:
        return load_tokenized(
            path, split, cfg.schema, parse, tokenizer, cache_dir, cfg.bad_rows, limit
        )

    train, counts = load(cfg.path, cfg.train_split, cfg.max_train_examples)
    if cfg.eval_path or cfg.eval_split:
        eval_data, eval_counts = load(
            cfg.eval_path or cfg.path, cfg.eval_split or "train", cfg.max_eval_examples
        )
        counts.update({f"eval_{k}": v for k, v in eval_counts.items()})
    else:
        if cfg.eval_size >= len(train):
            raise ValueError(f"dataset.eval_size={cfg.eval_size} >= {len(train)} training groups")
        split = train.train_test_split(test_size=cfg.eval_size, seed=seed)
        train, eval_data = split["train"], split["test"]
    return train, eval_data, counts
