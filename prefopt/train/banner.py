"""The run banner: what a training run is about to do, printed by rank 0 before any weight loads.

``run_facts`` gathers the facts from the composed config and the tokenized data (the parameter
count comes from the model's ``config.json`` on the meta device, so no weight is read);
``mistakes`` turns combinations that are almost surely wrong into plain-word warnings;
``format_banner`` lays both out. The loop prints it and writes ``RunFacts`` into summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefopt.config import LoggerConfig, ModelConfig, TrainConfig, TrainerConfig

if TYPE_CHECKING:  # the banner imports torch and transformers only where it needs them
    import datasets
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from prefopt.data.collate import GroupBatch
    from prefopt.data.loading import DataSplits, View
    from prefopt.losses import LossSpec
    from prefopt.model.parallel import World

log = logging.getLogger("prefopt")

BIG_MODEL_ON_CPU = 1e9  # parameters: beyond this a CPU step takes minutes to hours
LR_FACTOR = 10.0  # optimizer.lr this many times the recipe's (either way) is almost surely a typo
MAX_EPOCHS = 4.0  # more passes over the training groups than this: the run memorises them


@dataclass(frozen=True)
class RunFacts:
    """Everything the banner says, as plain values (also written to summary.json)."""

    model: str
    params: int | None  # None: the model's config.json is not reachable (no network, no cache)
    trainable: str  # "all" or "top N of M blocks"
    recipe: str  # conf/recipe/<name>.yaml, or "none"
    data: str  # schema and source
    train_groups: int
    eval_groups: int
    dropped: int  # rows skipped (bad rows, too long) in both splits
    truncated: int  # prompts and responses cut to the length limits
    k: int  # responses per group (max)
    pairs: str  # how pairwise losses read the groups, or "all K" for group losses
    steps: int
    epochs: float  # passes over the training views the steps make
    groups_per_step: int
    tokens_per_step: int  # mean over the training groups, in the chosen layout
    world_size: int
    devices: str
    precision: str
    master_dtype: str
    layout: str
    attention: str
    reference: str
    lr: float
    recipe_lr: float | None
    run_dir: str
    logger: str
    plan: str | None = None  # the memory plan, pre-formatted by its producer

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def count_params(path: str, trust_remote_code: bool = False) -> int | None:
    """Parameter count of the model at ``path`` from its config alone (meta device, no weights).

    None when the config cannot be read (a Hub id without network or cache)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return params_of_config(config, "meta")


def params_of_config(config: PretrainedConfig, device: str) -> int:
    """Build the architecture on ``device`` (meta: shapes only) and count; tied weights once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def tokens_per_group(data: datasets.Dataset, layout: str, views: list[View]) -> float:
    """Mean forward positions of one training view: padded/packed run the prompt once per
    response, shared once per group. (Padded adds padding on top: a lower bound there.)"""
    if not views:
        return 0.0
    prompts = data["prompt_ids"]
    responses = data["response_ids"]
    total = 0
    for row, idx in views:
        p, rs = len(prompts[row]), [len(responses[row][k]) for k in idx]
        total += p + sum(rs) if layout == "shared" else len(rs) * p + sum(rs)
    return total / len(views)


def logger_mode(cfg: LoggerConfig) -> str:
    """What the logger will do, in words: W&B online / offline / off."""
    if cfg.kind != "wandb":
        return "off (metrics.jsonl and the console only)"
    from prefopt.train.logger import wandb_mode

    mode = wandb_mode(cfg.mode)
    where = f"project {cfg.project}" + (f", group {cfg.group}" if cfg.group else "")
    hint = "; sync later with `wandb sync`" if mode == "offline" else ""
    return f"W&B {mode} ({where}{hint})"


def mistakes(f: RunFacts) -> list[str]:
    """Plain-word warnings for combinations that are almost surely a mistake."""
    out = []
    if f.params is not None and f.params >= BIG_MODEL_ON_CPU and f.devices.startswith("cpu"):
        out.append(
            f"{f.model} has {human(f.params)} parameters and would train on the CPU: one "
            "step takes hours. Run on GPUs (torchrun ... trainer.device=cuda) or pick "
            "model=smollm2_135m for a CPU run."
        )
    if f.recipe_lr and f.lr > 0:
        ratio = f.lr / f.recipe_lr
        if ratio >= LR_FACTOR or ratio <= 1 / LR_FACTOR:
            out.append(
                f"optimizer.lr={f.lr:g} is {ratio:.3g}x the {f.recipe} recipe's "
                f"{f.recipe_lr:g}; preference optimization is very sensitive to the "
                "learning rate (the papers' 7-8B runs use 3e-7 to 1e-6)."
            )
    if f.epochs > MAX_EPOCHS:
        out.append(
            f"{f.steps} steps x {f.groups_per_step} groups make {f.epochs:.1f} passes "
            f"over only {f.train_groups} training groups: the model will memorise them. "
            "Lower trainer.max_steps or use a larger dataset."
        )
    return out


def human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def format_banner(f: RunFacts, warnings: list[str]) -> str:
    params = human(f.params) if f.params is not None else "unknown (config.json not reachable)"
    lr = f"{f.lr:g}" + (f" (recipe {f.recipe_lr:g})" if f.recipe_lr else "")
    rows = [
        ("model", f"{f.model}: {params} parameters, trainable: {f.trainable}"),
        ("recipe", f.recipe),
        ("data", f.data),
        (
            "groups",
            f"{f.train_groups} train / {f.eval_groups} held out; {f.dropped} rows "
            f"dropped, {f.truncated} truncated; K = {f.k}, {f.pairs}",
        ),
        (
            "steps",
            f"{f.steps} ({f.epochs:.2f} epochs), {f.groups_per_step} groups and "
            f"~{human(f.tokens_per_step)} tokens per step, lr {lr}",
        ),
        ("devices", f"world size {f.world_size}: {f.devices}"),
        ("precision", f"{f.precision}, master weights {f.master_dtype}"),
        ("layout", f"{f.layout}; {f.attention}"),
        ("reference", f.reference),
        ("memory", f.plan or "no plan"),
        ("run dir", f.run_dir),
        ("logger", f.logger),
    ]
    lines = ["=" * 100, *(f"{k:<10} {v}" for k, v in rows)]
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join([*lines, "=" * 100])


def run_facts(
    cfg: TrainConfig,
    tok: PreTrainedTokenizerBase,
    data: DataSplits,
    spec: LossSpec,
    world: World,
    max_steps: int,
    plan: str | None = None,
    params: int | None = None,
) -> RunFacts:
    """The facts of a composed run: config, tokenizer, tokenized ``data`` (DataSplits), loss
    ``spec``, ``world`` (parallel.World) and the step count. Reads the model config, never
    weights; ``params``, when the caller counted them already (the memory plan), is used as is."""
    from prefopt.model.load import local_or_hub, tiny_llama_config
    from prefopt.model.parallel import resolve_precision
    from prefopt.train.extras import reference_model_needed

    t, d, m = cfg.trainer, cfg.dataset, cfg.model
    if params is None and m.source == "tiny":
        params = params_of_config(tiny_llama_config(m.tiny, tok), "meta")
    elif params is None:
        params = count_params(local_or_hub(m, cfg.cache_dir), m.trust_remote_code)
    counts = data.counts
    dropped = sum(v for k, v in counts.items() if "skipped" in k)
    truncated = sum(v for k, v in counts.items() if "truncated" in k)
    k = max((len(s) for s in data.train["scores"]), default=0)
    pairs = f"pairs: {d.pairs}" if spec.k == 2 else "all K responses per group"
    views = len(data.train_views)
    G = t.global_batch_groups
    tokens = tokens_per_group(data.train, t.layout, data.train_views) * G
    precision = resolve_precision(world.device, t.precision, t.master_dtype)
    lora = m.lora is not None
    if world.device.type == "cuda":
        import torch

        devices = f"{world.world_size} x {torch.cuda.get_device_name(world.device)}"
    else:
        devices = f"cpu ({os.cpu_count()} cores, {_threads()} torch threads per rank)"
    model_needed = reference_model_needed(spec, cfg.loss, t.reference)
    if not (spec.needs_reference or model_needed):
        reference = "none (reference-free loss)"
    elif lora:
        reference = "the policy with its adapters off (no second model)"
    elif not model_needed:
        reference = "precomputed log-probs (one no-grad pass, cached; no second model)"
    else:
        reference = "frozen sharded model from the same weight files"
    source = _short(d.path) + (f" (eval: {_short(d.eval_path)})" if d.eval_path else "")
    return RunFacts(
        model=m.name_or_path,
        params=params,
        trainable=_trainable(t, m),
        recipe=cfg.recipe.name,
        data=f"{d.schema}: {source}",
        train_groups=len(data.train),
        eval_groups=len(data.eval),
        dropped=dropped,
        truncated=truncated,
        k=k,
        pairs=pairs,
        steps=max_steps,
        epochs=max_steps * G / views if views else 0.0,
        groups_per_step=G,
        tokens_per_step=round(tokens),
        world_size=world.world_size,
        devices=devices,
        precision=f"{'bf16' if precision.bf16 else 'fp32'} compute, weights on disk {m.dtype}",
        master_dtype=str(precision.master).removeprefix("torch."),
        layout=t.layout,
        attention=attention_line(m, t, cfg.cache_dir, tok, world.device.type),
        reference=reference,
        lr=float(cfg.optimizer.lr),
        recipe_lr=cfg.recipe.lr,
        run_dir=str(cfg.run_dir),
        logger=logger_mode(cfg.logger),
        plan=plan,
    )


def attention_line(
    m: ModelConfig, t: TrainerConfig, cache_dir: str, tok: PreTrainedTokenizerBase, device: str
) -> str:
    """The kernel the run's attention uses, as the registry chooses it for this device, layout
    and precision and for the model's needs (a logit softcap, read from its config.json; when
    that cannot be read, the choice for a model without one)."""
    from prefopt.errors import PrefoptError
    from prefopt.model.attention import Target, choose, kernel_description
    from prefopt.model.load import model_config

    target = Target.of_trainer(t, device)
    try:
        name = model_config(m, cache_dir, tok, target)._attn_implementation
    except PrefoptError:  # the registry's refusal: the user's to fix
        raise
    except (OSError, ValueError):  # config.json unreachable (no network, no cache)
        name = choose(m.attn_implementation, target)
    return kernel_description(name, t.layout, device)


def _trainable(t: TrainerConfig, m: ModelConfig) -> str:
    if m.lora is not None:
        return f"LoRA adapters only (rank {m.lora.rank}; counts in the memory plan)"
    return f"top {t.train_top_blocks} blocks" if t.train_top_blocks else "all"


def _short(path: str) -> str:
    """A local file by its name (the full path is in the config), a Hub id as it is."""
    return Path(path).name if os.path.isfile(path) else path


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def batch_shapes(batch: GroupBatch) -> str:
    """One line per tensor field of a collated micro-batch: name, shape, dtype."""
    lines = []
    for name, value in vars(batch).items():
        if hasattr(value, "shape"):
            lines.append(
                f"  {name:<16} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
            )
    return "\n".join(lines)


def announce(facts: RunFacts, run_dir: str, status: str) -> list[str]:
    """Rank 0: print the banner, log its warnings, and write it into summary.json (the end of
    the run rewrites the summary; it carries ``banner`` again there). Returns the warnings."""
    from prefopt.model.parallel import is_main

    warnings = mistakes(facts)
    if is_main():
        print(format_banner(facts, warnings), flush=True)
        for w in warnings:
            log.warning(w)
        summary = {"status": status, "banner": facts.as_dict(), "warnings": warnings}
        Path(run_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    return warnings


def show_first_batch(micro_batches: list[GroupBatch]) -> None:
    """The dry run's last word: the shapes of the first step's micro-batches on this rank."""
    from prefopt.model.parallel import is_main

    if is_main():
        print(f"dry run: first step = {len(micro_batches)} micro-batch(es) on rank 0; the first:")
        print(batch_shapes(micro_batches[0]), flush=True)
        print("dry run: no weights loaded; drop trainer.dry_run to train.", flush=True)


def verdict(before: dict[str, float], after: dict[str, float]) -> str:
    """One line on whether held-out preference accuracy moved, for the end of a run."""
    a0, a1 = before.get("rewards/accuracy", math.nan), after.get("rewards/accuracy", math.nan)
    if not (math.isfinite(a0) and math.isfinite(a1)):
        return "verdict: no held-out accuracy to compare"
    delta = 100 * (a1 - a0)
    if delta >= 5:
        word = "learned: the model now prefers the better-scored response on more held-out prompts"
    elif delta <= -5:
        word = "got worse: check the learning rate and the data"
    else:
        word = "no clear change (under 5 points): train longer or raise the learning rate"
    return f"verdict: held-out reward accuracy {a0:.1%} -> {a1:.1%} ({delta:+.1f} points), {word}"
