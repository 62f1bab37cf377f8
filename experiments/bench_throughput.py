"""Training throughput: the ``trainer=gpu`` recipe of prefopt against TRL, on the same pairs.

    python experiments/bench_throughput.py --device cuda                      # 1B shape, 1 GPU
    python experiments/bench_throughput.py --device cpu --shape 135m --lengths half \\
        --pairs-per-step 8 --token-budget 4096 --steps 2 --warmup 1          # the CPU table
    python experiments/bench_throughput.py --device cpu --shape tiny --lengths tiny  # < 2 min

Both systems train the same random-init model (``--shape``: Llama-3.2-1B, SmolLM2-135M or a
tiny one; tied embeddings) on the same synthetic UltraFeedback-shaped pairs (prompt ~ lognormal
mean 180 / sd 120 tokens, response ~ 350 / 200, prompt + response <= 1024; ``half``: all halved),
step i on the same pairs in the same order, the same pairs per optimizer step, AdamW.

prefopt runs the real recipe: its config is composed by Hydra from ``conf/`` with
``trainer=gpu`` and the shape's model config (layout, token budget, precision, log-prob chunk,
compile, clipping and activation checkpointing as those files say; per row only the layout, the
loss, the attention kernel, the budget and the device are overridden), the kernel is the one the
registry chooses for that target (``prefopt.model.attention.choose``: ``auto``, or the row's
kernel; a row whose kernel cannot run here is skipped with the reason), micro-batches come from
the loop's ``step_micro_batches`` and each step is the loop's ``train_step`` (``prefopt_step``
below: the one call to adapt when its signature changes). TRL runs its trainers
(``bench_trl.py``) with their best settings that work here, and the recipe's activation
checkpointing.

Reported per row, over the timed steps (each timed from the end of the previous one, so data
preparation is included; seconds are wall time on GPU, and on CPU this process's CPU time, which
the other jobs of a shared machine do not inflate, with wall tokens/s beside it): tokens/s
counted both ways, ``tok/s (prompt once)`` (a pair is prompt + chosen + rejected) and ``tok/s
(prompt per pair)`` (prompt + chosen, prompt + rejected: what TRL processes); MFU = (6, or 8
with a reference) x N x prompt-once tokens/s over the peak FLOP/s of a matmul probe run just
before the row and timed the same way (bf16 on GPU, fp32 on CPU; N: every parameter, the tied
embedding once; attention FLOPs not counted); peak GPU memory; forward positions per step
(padding and repeated prompts included).
Results: experiments/results/throughput_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_trl, bench_report

from bench_report import write_results  # noqa: E402

import prefopt.losses  # noqa: F401,E402  (loss schemas, before composing)
from prefopt.data.loading import DataSplits  # noqa: E402
from prefopt.data.tokenize import TokenizedGroup  # noqa: E402
from prefopt.errors import ConfigError  # noqa: E402
from prefopt.losses import build_loss  # noqa: E402
from prefopt.model import parallel  # noqa: E402
from prefopt.model.attention import Target, choose, kernel_description, prepare  # noqa: E402
from prefopt.model.blocks import compile_blocks  # noqa: E402
from prefopt.model.load import tiny_tokenizer  # noqa: E402
from prefopt.train.optim import build_optimizer  # noqa: E402
from prefopt.train.setup import make_autocast  # noqa: E402
from prefopt.train.step import (  # noqa: E402
    LossContext,
    StepContext,
    step_micro_batches,
    train_step,
)
from prefopt.train.summary import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        rope_theta=100000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
}
# the model config whose dtype and attention the recipe reads (tiny.yaml pins sdpa for tests)
MODEL_CONF = {"1b": "llama3_2_1b", "135m": "smollm2_135m", "tiny": "smollm2_135m"}
# (prompt mean, prompt sd, response mean, response sd, max prompt, max prompt + response)
LENGTHS = {
    "full": (180, 120, 350, 200, 512, 1024),
    "half": (90, 60, 175, 100, 256, 512),
    "tiny": (22, 15, 44, 25, 64, 128),
}


class Run(NamedTuple):
    system: str  # "prefopt" or "trl"
    layout: str  # prefopt's trainer.layout; TRL pads
    loss: str  # simpo or refa_dynamic (K = 4), reference-free; dpo: a frozen reference model
    k: int = 2
    kernel: str = "auto"  # model.attn_implementation
    checkpointing: bool | None = None  # None: the recipe's (model.gradient_checkpointing)


K4 = "refa_dynamic"  # a group loss over all K = 4 responses
RUNS = {
    "trl": Run("trl", "padded", "simpo"),
    "padded": Run("prefopt", "padded", "simpo"),
    "packed": Run("prefopt", "packed", "simpo"),
    "shared": Run("prefopt", "shared", "simpo"),
    "shared-fa": Run("prefopt", "shared", "simpo", kernel="prefopt_varlen_fa"),
    "shared-torch": Run("prefopt", "shared", "simpo", kernel="prefopt_varlen_torch"),
    "shared-flex": Run("prefopt", "shared", "simpo", kernel="prefopt_flex"),
    "padded-k4": Run("prefopt", "padded", K4, k=4),
    "packed-k4": Run("prefopt", "packed", K4, k=4),
    "shared-k4": Run("prefopt", "shared", K4, k=4),
    "shared-fa-k4": Run("prefopt", "shared", K4, k=4, kernel="prefopt_varlen_fa"),
    "shared-torch-k4": Run("prefopt", "shared", K4, k=4, kernel="prefopt_varlen_torch"),
    "shared-flex-k4": Run("prefopt", "shared", K4, k=4, kernel="prefopt_flex"),
    "trl-dpo": Run("trl", "padded", "dpo"),
    "shared-dpo": Run("prefopt", "shared", "dpo"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--lengths", default="full", choices=sorted(LENGTHS))
    p.add_argument("--pairs-per-step", type=int, default=64, help="groups per optimizer step")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--token-budget", type=int, help="prefopt micro-batch tokens (trainer=gpu's)")
    p.add_argument("--trl-micro-pairs", type=int, help="TRL per-device batch (all pairs of a step)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {sorted(RUNS)}")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override")
    p.add_argument("--tag", help="results file tag (default: <device>_<shape>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: all cores)")
    a = p.parse_args()
    a.tag = a.tag or f"{a.device}_{a.shape}"
    a.trl_micro_pairs = a.trl_micro_pairs or a.pairs_per_step
    return a


def make_groups(n: int, k: int, args: argparse.Namespace, tok) -> list[TokenizedGroup]:
    """n groups of k responses; lengths lognormal with the target mean and sd, then clipped."""
    pm, ps, rm, rs, max_prompt, max_len = LENGTHS[args.lengths]
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(args.seed)

    def lengths(count: int, mean: float, sd: float) -> list[int]:
        sigma2 = math.log(1 + sd**2 / mean**2)  # lognormal with that mean and sd
        z = torch.randn(count, generator=g, dtype=torch.float64)
        return (z * math.sqrt(sigma2) + math.log(mean) - sigma2 / 2).exp().round().long().tolist()

    def ids(count: int) -> list[int]:  # ordinary tokens only (the specials are 256-259)
        return torch.randint(260, vocab, (count,), generator=g).tolist()

    out = []
    for p_len, r_lens in zip(
        lengths(n, pm, ps), [lengths(k, rm, rs) for _ in range(n)], strict=True
    ):
        prompt = [tok.bos_token_id, *ids(min(max(p_len, 4), max_prompt) - 1)]
        responses = [[*ids(max(r, 1)), tok.eos_token_id][: max_len - len(prompt)] for r in r_lens]
        has_eos = [r[-1] == tok.eos_token_id for r in responses]
        out.append(TokenizedGroup(prompt, responses, has_eos, [float(k - j) for j in range(k)]))
    return out


def token_counts(groups: list[TokenizedGroup]) -> tuple[int, int]:
    """(prompt once + every response, prompt repeated for every response)."""
    once = sum(len(g.prompt_ids) + sum(map(len, g.response_ids)) for g in groups)
    per_pair = sum(
        len(g.prompt_ids) * len(g.response_ids) + sum(map(len, g.response_ids)) for g in groups
    )
    return once, per_pair


def measure_peak_flops(device: str) -> float:
    """FLOP/s of a large matmul, bf16 on GPU and fp32 on CPU: the MFU denominator. The best of
    five short probes, so a moment of contention on a shared machine does not lower it."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device == "cuda" else (1024, torch.float32, 4)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    best = 0.0
    for _ in range(5):
        t0 = stamp(device)
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / elapsed(device, t0, stamp(device)))
    return best


def stamp(device: str) -> tuple[float, float]:
    """(wall clock, this process's CPU time), after the device's queue drains."""
    sync(device)
    return time.perf_counter(), time.process_time()


def elapsed(device: str, a: tuple[float, float], b: tuple[float, float]) -> float:
    """Seconds between two stamps for rates: wall time on GPU; on CPU the process's CPU time,
    which other jobs on a shared machine do not inflate (runs use one torch thread)."""
    return b[0] - a[0] if device == "cuda" else b[1] - a[1]


def build_model(args: argparse.Namespace, attn: str, tok, checkpointing: bool):
    """The random-init model of ``--shape``, fp32 master weights (the recipe's: the optimizer's
    copy is fp32, compute bf16 under FSDP2's mixed precision on GPU)."""
    config = LlamaConfig(
        **SHAPES[args.shape],
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = attn
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fresh(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def compose_recipe(args: argparse.Namespace, run: Run) -> DictConfig:
    """The run's config exactly as ``python -m prefopt.train trainer=gpu ...`` composes it."""
    budget = [f"trainer.micro_batch_tokens={args.token_budget}"] if args.token_budget else []
    overrides = [
        f"model={MODEL_CONF[args.shape]}",
        "trainer=gpu",
        f"loss={run.loss}",
        "~experiment",
        f"trainer.layout={run.layout}",
        f"trainer.device={args.device}",
        f"trainer.global_batch_groups={args.pairs_per_step}",
        f"model.attn_implementation={run.kernel}",
        *budget,
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="train", overrides=overrides)


def prefopt_step(policy, ref, micro_batches, spec, loss_fn, t: DictConfig, autocast) -> float:
    """One optimizer step's gradients by the loop's own ``train_step``; its gradient norm
    (NaN when the loop would skip the step)."""
    ctx = StepContext(LossContext(spec, loss_fn, t.logps_chunk_size), autocast, t.max_grad_norm)
    result = train_step(policy, ref, micro_batches, ctx)
    return result.metrics["grad_norm"] if result.applied else math.nan


def run_prefopt(args, run: Run, groups, tok, world, peak: float) -> dict:
    fresh(args.device)
    cfg = compose_recipe(args, run)
    t = cfg.trainer
    attn = choose(cfg.model.attn_implementation, Target.of_trainer(t, args.device))
    prepare(attn)
    run = run._replace(checkpointing=cfg.model.gradient_checkpointing)
    model = build_model(args, attn, tok, run.checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    spec, loss_fn = build_loss(cfg.loss)
    ref_hf = copy.deepcopy(model) if spec.needs_reference else None
    if t.compile:
        for m in filter(None, (model, ref_hf)):
            compile_blocks(m)
    precision = parallel.resolve_precision(world.device, t.precision, t.master_dtype)
    policy = parallel.shard(model, world, precision)  # fp32 master weights, as the loop
    ref = parallel.shard(ref_hf, world, precision, trainable=False) if ref_hf else None
    optimizer = build_optimizer(cfg.optimizer, list(policy.parameters()))
    autocast = make_autocast(precision, world.device)
    columns = ("prompt_ids", "response_ids", "has_eos", "scores")
    rows = {c: [getattr(g, c) for g in groups] for c in columns}
    train = datasets.Dataset.from_dict(rows | {"id": [str(i) for i in range(len(groups))]})
    views = [(i, tuple(range(run.k))) for i in range(len(groups))]
    data = DataSplits(train, views, train, views, Counter())
    G, ends, positions = args.pairs_per_step, [stamp(args.device)], 0
    for step in range(args.warmup + args.steps):
        micro = step_micro_batches(
            t,
            data,
            list(range(step * G, (step + 1) * G)),
            world,
            tok.pad_token_id,
        )
        if not math.isfinite(prefopt_step(policy, ref, micro, spec, loss_fn, t, autocast)):
            raise FloatingPointError(f"{run}: step {step} was not finite")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(stamp(args.device))
        if step >= args.warmup:
            positions += sum(b.forward_tokens for b in micro)
    name = f"prefopt {run.layout} {run.loss}" + (" +ckpt" if run.checkpointing else "")
    kernel = kernel_description(attn, t.layout, world.device)
    extra = dict(
        kernel=kernel,
        budget=t.micro_batch_tokens,
        compile=bool(t.compile),
        precision="bf16" if precision.bf16 else "fp32",
    )
    return result(
        args,
        name,
        attn,
        run,
        groups,
        ends,
        n_params,
        positions,
        peak,
        micro_batches=len(micro),
        **extra,
    )


def result(args, name, attn, run: Run, groups, ends, n_params, positions, peak, **extra) -> dict:
    G = args.pairs_per_step
    timed = groups[args.warmup * G : (args.warmup + args.steps) * G]
    pairs = list(zip(ends, ends[1:], strict=False))[args.warmup :]
    step_s = [elapsed(args.device, a, b) for a, b in pairs]
    wall_s = sum(b[0] - a[0] for a, b in pairs)
    once, per_pair = token_counts(timed)
    seconds = sum(step_s)
    flops_per_token = (6 + (2 if run.loss == "dpo" else 0)) * n_params
    mem = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    r = dict(
        system=name,
        attn=attn,
        k=run.k,
        reference=run.loss == "dpo",
        checkpointing=run.checkpointing,
        tokens_per_s=once / seconds,
        tokens_per_s_prompt_per_pair=per_pair / seconds,
        wall_tokens_per_s=once / wall_s,
        clock="wall" if args.device == "cuda" else "process CPU time",
        mfu=flops_per_token * once / seconds / peak,
        peak_flops=peak,
        peak_mem_gib=mem,
        step_s_median=statistics.median(step_s),
        timed_steps=len(step_s),
        tokens_per_step=once / len(step_s),
        forward_positions_per_step=positions / len(step_s),
        params=n_params,
        **extra,
    )
    mem_s = f"{mem:.1f} GiB" if mem is not None else "n/a"
    print(
        f"{name:<32} K={run.k} {attn:<18} {r['tokens_per_s']:>9.0f} tok/s  MFU {r['mfu']:.1%}"
        f"  peak {mem_s}",
        flush=True,
    )
    return r


def table_of(args: argparse.Namespace) -> tuple[dict, tuple]:
    return SHAPES[args.shape], LENGTHS[args.lengths]


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is visible (use --device cpu)")
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    runs = [RUNS[name] for name in args.runs.split(",") if name]
    commit = git_commit()  # the code this process imported (the tree may move while it runs)
    tok = tiny_tokenizer()  # pad/BOS/EOS ids only: the data are token ids already
    n = (args.warmup + args.steps) * args.pairs_per_step
    groups4 = make_groups(n, 4, args, tok)
    groups2 = [
        TokenizedGroup(g.prompt_ids, g.response_ids[:2], g.has_eos[:2], g.scores[:2])
        for g in groups4
    ]
    peak = measure_peak_flops(args.device)
    print(f"measured peak: {peak / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    for run in (r for r in runs if r.system == "trl"):  # first, before prefopt's process group
        from bench_trl import run_trl

        # the recipe's activation checkpointing, as prefopt's rows run it
        run = run._replace(checkpointing=compose_recipe(args, run).model.gradient_checkpointing)
        try:
            results.append(run_trl(args, run, groups2, tok, measure_peak_flops(args.device)))
        except Exception as e:  # noqa: BLE001  (a TRL failure must not lose prefopt's numbers)
            print(f"TRL {run.loss} skipped: {type(e).__name__}: {e}", flush=True)
        write_results(
            args, results, peak, commit, *table_of(args)
        )  # after every row: a time limit keeps them
    world = parallel.init_distributed(args.device)
    for run in (r for r in runs if r.system == "prefopt"):
        row_groups = groups4 if run.k == 4 else groups2
        try:
            row = run_prefopt(args, run, row_groups, tok, world, measure_peak_flops(args.device))
        except ConfigError as e:  # a kernel that cannot run here: one line, the next row
            print(f"{run.layout} K={run.k} {run.kernel} skipped: {e}", flush=True)
            continue
        results.append(row)
        write_results(args, results, peak, commit, *table_of(args))
    print(f"wrote {write_results(args, results, peak, commit, *table_of(args))}.{{json,md}}")
    parallel.destroy()


if __name__ == "__main__":
    main()
