"""Reference log-probs precomputed once (``trainer.reference=precompute``) instead of a frozen
reference model in the loop: one no-grad pass over every response of a split, cached next to the
tokenized data and keyed by model, precision and data, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import AbstractContextManager
from pathlib import Path

import datasets
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from prefopt.data.loading import make_views
from prefopt.evaluation import batches
from prefopt.stats import group_stats

log = logging.getLogger(__name__)


def reference_key(model_cfg: DictConfig, seed: int, precision: str, data: datasets.Dataset) -> str:
    """Everything the cached values depend on: weights (by identity), numerics and the data."""
    ident = OmegaConf.to_container(model_cfg, resolve=True)
    ident.pop("gradient_checkpointing", None)  # does not change values
    blob = json.dumps([ident, seed, precision, data._fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def precompute_reference(
    model: PreTrainedModel,
    data: datasets.Dataset,
    key: str,
    cache_dir: str | None,
    *,
    batch_groups: int,
    pad_id: int,
    chunk_size: int,
    autocast: AbstractContextManager,
) -> datasets.Dataset:
    """``data`` with ``ref_logps`` and ``ref_eos_logps`` columns (one value per response)."""
    target = Path(cache_dir, "reference", key) if cache_dir else None
    if target is not None and (target / "dataset_info.json").is_file():
        log.info("reference log-probs: cached at %s", target)
        return datasets.load_from_disk(str(target))
    was_training = model.training
    model.eval()
    views = make_views(data, None)
    logps: list[list[float]] = []
    eos: list[list[float]] = []
    device = next(model.parameters()).device
    for batch in batches(data, views, list(range(len(views))), batch_groups, pad_id, device):
        with autocast:
            stats = group_stats(model, batch, chunk_size)
        for b in range(batch.num_groups):
            k = int(batch.mask[b].sum())  # views list every response in order
            logps.append(stats.logps[b, :k].float().tolist())
            eos.append(stats.eos_logps[b, :k].float().tolist())
    model.train(was_training)
    out = data.add_column("ref_logps", logps).add_column("ref_eos_logps", eos)
    if target is not None:
        tmp = target.with_name(f".tmp-{key}-{os.getpid()}")
        out.save_to_disk(str(tmp))
        if not target.exists():
            tmp.rename(target)
        out = datasets.load_from_disk(str(target))
    return out
