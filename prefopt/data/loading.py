"""Read a source (local file or Hub id), parse rows, tokenize, cache; build group views.

Rows come from :mod:`prefopt.data.sources`, so every error names the file and line (or row) and
the key. Tokenized data is cached as an Arrow dataset under ``<cache_dir>/tokenized/<key>``; the
key hashes the source (file content or Hub id + split), the schema options, the tokenizer
fingerprint and the tokenize options, so a stale cache is never reused. Each entry carries a
manifest of its files' SHA-256 sums: a damaged entry is named in the log, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import socket
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import datasets

from prefopt.atomic import file_sha256, publish_dir
from prefopt.config import BadRows, DatasetConfig, Pairs, check_choice
from prefopt.data.collate import Group
from prefopt.data.example import DataError
from prefopt.data.schemas import ParseOptions, parse_row
from prefopt.data.sources import iter_rows, read_rows, source_key
from prefopt.data.tokenize import (
    TokenizedGroup,
    Tokenizer,
    options_key,
    tokenizer_fingerprint,
)
from prefopt.errors import ConfigError

__all__ = [
    "DataSplits",
    "build_splits",
    "group_at",
    "iter_rows",
    "load_tokenized",
    "make_views",
    "view_group",
]
log = logging.getLogger(__name__)
datasets.disable_progress_bars()  # one bar per cache write drowns the training log
CACHE_VERSION = "2"  # 2: entries carry manifest.json
LOGGED_SKIPS = 5  # the first skipped rows are logged one by one; all are counted
View = tuple[int, tuple[int, ...]]  # (row of the tokenized dataset, response indices)


class DataSplits(NamedTuple):
    train: datasets.Dataset
    train_views: list[View]
    eval: datasets.Dataset
    eval_views: list[View]
    counts: Counter[str]


def _manifest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _write_cache(target: Path, data: datasets.Dataset, counts: Counter[str]) -> None:
    """Write under a name unique across nodes sharing the filesystem (host, pid, random), then
    publish in one rename; every rank tokenizes and the first to finish publishes."""
    unique = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.with_name(f".tmp-{target.name}-{unique}")
    data.save_to_disk(str(tmp / "data"))
    (tmp / "counts.json").write_text(json.dumps(counts))
    files = _manifest(tmp / "data")
    (tmp / "manifest.json").write_text(json.dumps({"rows": len(data), "files": files}))
    publish_dir(tmp, target)


def _read_cache(target: Path) -> tuple[datasets.Dataset, Counter[str]] | None:
    """The cached entry, or None when there is none; a damaged one is named, removed, and None."""
    if not target.exists():
        return None
    try:
        manifest = json.loads((target / "manifest.json").read_text())
        if _manifest(target / "data") != manifest["files"]:
            raise ValueError("file checksums differ from manifest.json")
        data = datasets.load_from_disk(str(target / "data"))
        if len(data) != manifest["rows"]:
            raise ValueError(f"{len(data)} rows, manifest.json says {manifest['rows']}")
        counts = Counter(json.loads((target / "counts.json").read_text()))
    except Exception as e:  # any unreadable piece means the same thing: rebuild the entry
        reason = f"{type(e).__name__}: {e}"
        log.warning("tokenized cache %s is damaged (%s); rebuilding it", target, reason)
        trash = target.with_name(f".damaged-{target.name}-{secrets.token_hex(4)}")
        try:  # a rename is atomic: a rank that rebuilt it meanwhile keeps its fresh copy
            os.rename(target, trash)
        except OSError:
            return None
        shutil.rmtree(trash, ignore_errors=True)
        return None
    return data, counts


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
    """The tokenized groups of one split (Arrow, lazily indexed) and the counts of what happened.

    ``bad_rows=error`` raises the first bad row's :class:`DataError`; ``skip`` drops every bad
    row (unreadable line, malformed row, truncation policy ``skip``) and counts it.
    """
    check_choice("dataset.bad_rows", bad_rows, BadRows)
    key = hashlib.sha256(
        "\x00".join(
            [
                CACHE_VERSION,
                source_key(path, split),
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
    cached = _read_cache(target) if target is not None else None
    if cached is not None:
        cached[0].info.description = path  # the source named in later errors
        return cached
    columns: dict[str, list] = {
        k: [] for k in ("prompt_ids", "response_ids", "has_eos", "scores", "id")
    }
    counts: Counter[str] = Counter()
    for where, row, error in itertools.islice(read_rows(path, split), max_examples):
        try:
            if error is not None:
                raise error
            example = parse_row(schema, row, where, parse_opts)
            if len(set(example.responses)) == 1:  # nothing to prefer, whatever the scores say
                counts["skipped_identical_responses"] += 1
                continue
            group = tokenizer(example, where)
        except DataError as e:
            if bad_rows == "error":
                raise
            counts["skipped_bad_rows"] += 1
            if counts["skipped_bad_rows"] <= LOGGED_SKIPS:
                log.warning("skipping bad row: %s", e)
            continue
        if group is not None:
            for k in columns:
                columns[k].append(getattr(group, k))
    counts.update(tokenizer.counts)
    tokenizer.counts.clear()
    if counts["skipped_bad_rows"] > LOGGED_SKIPS:
        log.warning("%s: %d bad rows skipped in all", path, counts["skipped_bad_rows"])
    if not columns["id"]:
        raise DataError(
            f"{path} ({split}): no usable rows ({dict(counts) or 'the file is empty'})",
            fix="check dataset.schema and the file; bad_rows=skip drops bad rows",
        )
    data = datasets.Dataset.from_dict(columns, info=datasets.DatasetInfo(description=path))
    if target is not None:
        _write_cache(target, data, counts)
        data = datasets.load_from_disk(str(target / "data"))
        data.info.description = path
    return data, counts


def group_at(data: datasets.Dataset, i: int) -> TokenizedGroup:
    return TokenizedGroup(**data[i])


def view_group(data: datasets.Dataset, view: View) -> Group:
    """The tokenized group a view reads and the indices of its responses."""
    row, idx = view
    return group_at(data, row), idx


def make_views(data: datasets.Dataset, pairs: str | None) -> list[View]:
    """Index views of the groups: all responses (pairs=None) or score-ordered pairs.

    best_vs_worst: one pair per group; best_vs_each: the best against every lower-scored response;
    all_pairs: every pair with distinct scores. Pairs list the higher-scored response first.
    A split where no view carries a preference (two different scores) cannot train: it raises
    :class:`DataError` naming the source (``data.info.description``).
    """
    if pairs is not None:
        check_choice("dataset.pairs", pairs, Pairs)
    scores = data["scores"]
    views = _views(scores, pairs)
    tied = sum(max(s) == min(s) for s in scores)
    if tied == len(scores):
        source = data.info.description or "the dataset"
        raise DataError(
            f"{source}: no usable {'group' if pairs is None else 'pair'}: all {tied} groups have "
            f"equal scores{'' if pairs is None else f' (dataset.pairs={pairs})'}",
            fix="check dataset.score_field / the scores column; a preference needs two "
            "different scores in a group",
        )
    if tied:
        kept = "no pair" if pairs in ("best_vs_each", "all_pairs") else "kept; losses mark invalid"
        log.warning("%d of %d groups have all scores equal (%s)", tied, len(scores), kept)
    return views


def _views(scores: list[list[float]], pairs: str | None) -> list[View]:
    if pairs is None:
        return [(i, tuple(range(len(s)))) for i, s in enumerate(scores)]
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
    cfg: DatasetConfig, tokenizer: Tokenizer, cache_dir: str | None, seed: int
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
        if not 0 < cfg.eval_size < len(train):
            raise ConfigError(
                f"dataset.eval_size={cfg.eval_size}: must hold out between 1 and "
                f"{len(train) - 1} of the {len(train)} training groups",
                fix="set dataset.eval_size, or give dataset.eval_path / eval_split",
            )
        split = train.train_test_split(test_size=cfg.eval_size, seed=seed)
        train, eval_data = split["train"], split["test"]
    return train, eval_data, counts
