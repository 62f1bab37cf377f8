"""What the training loop builds before its first step: the tokenized data and its views, the
sharded policy and the reference (a model, or cached log-probs), and the autocast context.
``prefopt/train/loop.py`` keeps the loop itself."""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from prefopt.config import DatasetConfig, TrainConfig
from prefopt.data.loading import DataSplits, build_splits, make_views
from prefopt.data.tokenize import TokenizeOptions, Tokenizer
from prefopt.losses import LossSpec
from prefopt.model import adapters, parallel
from prefopt.model.attention import Target
from prefopt.model.blocks import compile_blocks, freeze_below_top_blocks
from prefopt.model.load import empty_model, initial_weights, load_model, model_config
from prefopt.model.logprobs import StatsModel
from prefopt.train.extras import reference_model_needed
from prefopt.train.passes import PassOptions
from prefopt.train.reference import precompute_reference, reference_key

log = logging.getLogger("prefopt")


def build_models(
    cfg: TrainConfig,
    spec: LossSpec,
    tok: PreTrainedTokenizerBase,
    data: DataSplits,
    world: parallel.World,
    precision: parallel.Precision,
    passes: PassOptions,
) -> tuple[StatsModel, StatsModel | adapters.AdaptersOff | None, DataSplits]:
    """The sharded policy and, from the same starting weights, the reference: a frozen sharded
    model (``trainer.reference=model``), or cached log-probs attached to both splits
    (``precompute``: no second model in memory).

    Both are built on the meta device, sharded, and filled from the weight files: each rank
    allocates and reads only its own shards, so host memory per rank stays a small fraction of
    the model. The reference is loaded from the same files, never copied from the policy.
    """
    t, device = cfg.trainer, world.device.type
    with parallel.main_first():  # rank 0 converts or downloads once; the others reuse it
        config = model_config(cfg.model, cfg.cache_dir, tok, Target.of_trainer(t, device))
        weights = initial_weights(cfg.model, cfg.cache_dir, tok, cfg.seed)
    ref_model = reference_model_needed(spec, cfg.loss, t.reference)
    quantized = cfg.model.quantize != "none"

    def sharded(trainable: bool) -> StatsModel:  # one more model from the same files
        if quantized:  # QLoRA: bitsandbytes quantizes while loading; each rank holds the base
            model = load_model(cfg.model, cfg.cache_dir, tok, cfg.seed)
        else:
            model = empty_model(cfg.model, config)
        if trainable:
            freeze_below_top_blocks(model, t.train_top_blocks)  # CPU demo: the top blocks only
            # LoRA: adapters before compile and sharding (no-op without model.lora)
            model = adapters.apply_adapters(model, cfg.model, precision.bf16)
        if t.compile:  # per block, before sharding
            compile_blocks(model)
        wrapper = parallel.shard(model, world, precision, trainable=trainable)
        if not quantized:
            parallel.load_weights(wrapper, weights, adapters.base_checkpoint_key)
        if adapters.is_adapted(wrapper):  # LoRA: initialise the adapters after allocation
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                adapters.reset_adapters(wrapper)
        return wrapper

    policy = sharded(trainable=True)
    lora = adapters.is_adapted(policy)  # LoRA: the reference is the policy with adapters off
    ref = sharded(trainable=False) if ref_model and not lora else None
    if ref_model and lora:
        ref = adapters.AdaptersOff(policy)  # LoRA: no second model
    if lora:
        log.info("%s", adapters.summary(policy).line())
    if spec.needs_reference and not ref_model:
        cache = cfg.cache_dir if cfg.dataset.cache else None

        def one(split: datasets.Dataset) -> datasets.Dataset:
            key = reference_key(cfg.model, cfg.seed, t.precision, split)
            with adapters.adapters_off(policy):  # LoRA: the base, whatever the adapters' init
                return precompute_reference(policy, split, key, cache, passes)

        data = data._replace(train=one(data.train), eval=one(data.eval))
    return policy, ref, data


def make_autocast(precision: parallel.Precision, device: torch.device) -> AbstractContextManager:
    """bf16 autocast when computing in bf16 (FSDP2 already gathers bf16 parameters; autocast
    covers the ops between them); nothing in fp32."""
    if precision.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class DataRun(Protocol):
    """What data preparation reads of a run's config (``TrainConfig``, ``EvaluateConfig``)."""

    dataset: DatasetConfig
    cache_dir: str
    seed: int


def prepare_data(cfg: DataRun, tok: PreTrainedTokenizerBase, spec: LossSpec) -> DataSplits:
    """Tokenized train/eval groups and their views (score-ordered pairs for pairwise losses)."""
    d = cfg.dataset
    cache = str(Path(cfg.cache_dir)) if d.cache else None
    tokenizer = Tokenizer(tok, TokenizeOptions.of(d))
    train, eval_data, counts = build_splits(d, tokenizer, cache, cfg.seed)
    log.info("data: %d train / %d eval groups; %s", len(train), len(eval_data), dict(counts))
    if spec.k not in (None, 2):
        raise ValueError(f"loss {spec.name!r} wants K={spec.k}; only K=2 or any K is supported")
    pairs = d.pairs if spec.k == 2 else None
    return DataSplits(
        train, make_views(train, pairs), eval_data, make_views(eval_data, pairs), counts
    )
