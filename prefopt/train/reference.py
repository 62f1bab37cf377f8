"""Reference log-probs precomputed once (``trainer.reference=precompute``) instead of a frozen
reference model in the loop: one no-grad pass over every response of a split, cached next to the
tokenized data and keyed by model, precision and data, so a stale cache is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import datasets
import torch

from prefopt.atomic import publish_dir
from prefopt.config import ModelConfig
from prefopt.data.loading import make_views, view_group
from prefopt.model.logprobs import StatsModel
from prefopt.model.parallel import all_gather_objects, barrier, is_main
from prefopt.train.passes import PassOptions, evaluating, rank_batches

log = logging.getLogger(__name__)


def reference_key(model_cfg: ModelConfig, seed: int, precision: str, data: datasets.Dataset) -> str:
    """Everything the cached values depend on: weights (by identity), numerics and the data."""
    ident = dataclasses.asdict(model_cfg)
    ident.pop("gradient_checkpointing", None)  # does not change values
    blob = json.dumps([ident, seed, precision, data._fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def precompute_reference(
    model: StatsModel,
    data: datasets.Dataset,
    key: str,
    cache_dir: str | None,
    opts: PassOptions,
) -> datasets.Dataset:
    """``data`` with ``ref_logps`` and ``ref_eos_logps`` columns (one value per response).

    Each rank computes a slice; the slices are gathered so every rank holds the whole split.
    The pass runs padded rows, whatever the run's layout: the cache holds per-response values.
    """
    target = Path(cache_dir, "reference", key) if cache_dir else None
    if target is not None and (target / "dataset_info.json").is_file():
        log.info("reference log-probs: cached at %s", target)
        return datasets.load_from_disk(str(target))
    views, opts = make_views(data, None), opts._replace(layout="padded")
    mine: dict[int, tuple[list[float], list[float]]] = {}
    with evaluating(model):
        for p in rank_batches(len(views), lambda i: view_group(data, views[i]), model, opts):
            with opts.autocast:
                stats = model(p.batch, opts.chunk_size)
            for b, row in enumerate(p.items[: p.own]):  # the rest evens out the ranks' slices
                k = int(p.batch.mask[b].sum())  # views list every response in order
                logps, eos = stats.logps[b, :k], stats.eos_logps[b, :k]
                mine[row] = (logps.float().tolist(), eos.float().tolist())
    merged = {row: v for part in all_gather_objects(mine) for row, v in part.items()}
    out = data.add_column("ref_logps", [merged[i][0] for i in range(len(data))])
    out = out.add_column("ref_eos_logps", [merged[i][1] for i in range(len(data))])
    if target is not None:
        if is_main():
            tmp = target.with_name(f".tmp-{key}-{os.getpid()}")
            out.save_to_disk(str(tmp))
            publish_dir(tmp, target)
        barrier()
        out = datasets.load_from_disk(str(target))
    return out
