"""Reference log-probs precomputed once (``trainer.reference=precompute``) instead of a frozen
reference model in the loop: one no-grad pass over every response of a split, cached next to the
tokenized data and keyed by model, precision and data, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import datasets
import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.atomic import publish_dir
from prefopt.data.loading import make_views
from prefopt.data.packing import batches
from prefopt.model.logprobs import StatsModel
from prefopt.model.parallel import (
    all_gather_objects,
    barrier,
    is_main,
    rank_slice,
    reshard,
)
from prefopt.train.passes import PassOptions

log = logging.getLogger(__name__)


def reference_key(model_cfg: DictConfig, seed: int, precision: str, data: datasets.Dataset) -> str:
    """Everything the cached values depend on: weights (by identity), numerics and the data."""
    ident = OmegaConf.to_container(model_cfg, resolve=True)
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
    """
    target = Path(cache_dir, "reference", key) if cache_dir else None
    if target is not None and (target / "dataset_info.json").is_file():
        log.info("reference log-probs: cached at %s", target)
        return datasets.load_from_disk(str(target))
    was_training = model.training
    model.eval()
    views = make_views(data, None)
    order, own = rank_slice(len(views), opts.rank, opts.world_size)
    device = next(model.parameters()).device
    mine: dict[int, tuple[list[float], list[float]]] = {}
    for start, batch in zip(
        range(0, len(order), opts.batch_groups),
        batches(data, views, order, opts.batch_groups, opts.pad_id, device),
        strict=True,
    ):
        with opts.autocast:
            stats = model(batch, opts.chunk_size)
        for b in range(batch.num_groups):
            if start + b < own:  # the rest is padding that evens out the ranks' slices
                k = int(batch.mask[b].sum())  # views list every response in order
                mine[order[start + b]] = (
                    stats.logps[b, :k].float().tolist(),
                    stats.eos_logps[b, :k].float().tolist(),
                )
    model.train(was_training)
    reshard(model)
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
