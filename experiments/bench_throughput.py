"""Training throughput: prefopt's batch layouts against TRL's SimPO (CPOTrainer, loss_type=simpo).

    python experiments/bench_throughput.py --device cuda            # H100: Llama-3.2-1B shape
    python experiments/bench_throughput.py --device cpu --tiny      # CPU smoke test, < 2 min

Both systems train the same random-init Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32/8
heads, ffn 8192, vocab 128256, tied embeddings; fp32 master weights, bf16 autocast on GPU) on the
same synthetic UltraFeedback-shaped pairs (prompt ~ lognormal mean 180 / sd 120 tokens, response
~ lognormal mean 350 / sd 200, prompt + response <= 1024), step i on the same pairs in the same
order, with the same pairs per optimizer step, AdamW, clipping at 1.0. prefopt runs its loop's
code (token-budget micro-batches, ``collate_layout``, ``forward_loss`` on the FSDP2-wrapped
``StatsModel``); TRL runs ``CPOTrainer.train`` with a sequential sampler. ``--tiny`` keeps every
code path and shrinks the model, the lengths and the step count.

Reported per system, over the timed steps (each step timed from the end of the previous one, so
data preparation is included): tokens/s, counting a pair as prompt + chosen + rejected (the
prompt once; a K-group as prompt + K responses), MFU = 6 N tokens/s / peak FLOP/s (N: every
parameter, the tied embedding once; attention FLOPs not counted), peak GPU memory, and the
positions the forward computes (padding and repeated prompts included). K = 4 groups run on
prefopt only (refa_dynamic). Results go to experiments/results/throughput_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

from prefopt import parallel
from prefopt.data.packing import collate_layout, plan_micro_batches, view_size
from prefopt.data.tokenize import TokenizedGroup
from prefopt.evaluation import forward_loss
from prefopt.losses import get_spec
from prefopt.metrics import MetricSums
from prefopt.models import tiny_tokenizer
from prefopt.stats import compile_blocks

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=8192, vocab_size=128256, max_position_embeddings=2048,
            rope_theta=500000.0, tie_word_embeddings=True)  # fmt: skip
TINY = dict(FULL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, vocab_size=512)  # fmt: skip
# (prompt mean, prompt sd, response mean, response sd, max prompt, max prompt + response)
LENGTHS = {"full": (180, 120, 350, 200, 512, 1024), "tiny": (22, 15, 44, 25, 64, 128)}
PEAK_FLOPS = {"cuda": 989e12, "cpu": None}  # H100 SXM dense bf16; no meaningful CPU peak


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU smoke test)")
    p.add_argument("--pairs-per-step", type=int, help="groups per optimizer step (64; tiny 8)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (8; tiny 5)")
    p.add_argument("--warmup", type=int, help="untimed first steps (2; tiny 1)")
    p.add_argument("--token-budget", type=int, help="prefopt micro-batch positions (16384; 512)")
    p.add_argument("--trl-micro-pairs", type=int, help="TRL per-device batch in pairs (4; tiny 4)")
    p.add_argument("--layouts", default="padded,packed,shared")
    p.add_argument("--k4-layouts", default="packed,shared", help="K=4 runs ('' to skip)")
    p.add_argument("--attn", default="auto", help="padded/TRL attention; auto: fa2 or sdpa")
    p.add_argument("--attn-packed", default="auto", help="auto: fa2, else flex (GPU) / sdpa")
    p.add_argument("--attn-shared", default="auto", help="auto: flex (GPU) / sdpa (CPU)")
    p.add_argument("--chunk-size", type=int, default=4096, help="prefopt log-prob chunk tokens")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both systems")
    p.add_argument("--compile", action="store_true", help="prefopt: torch.compile each block")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--peak-flops", type=float, help="for MFU (default: 989e12 on cuda)")
    p.add_argument("--tag", help="results file tag (default: <device>[_tiny])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads (1: a busy machine's "
                   "other processes cannot stall an OpenMP barrier)")  # fmt: skip
    a = p.parse_args()
    small = a.tiny
    for name, full, tiny in [("pairs_per_step", 64, 8), ("steps", 8, 5), ("warmup", 2, 1),
                             ("token_budget", 16384, 512), ("trl_micro_pairs", 4, 4)]:  # fmt: skip
        if getattr(a, name) is None:
            setattr(a, name, tiny if small else full)
    a.peak_flops = a.peak_flops or PEAK_FLOPS[a.device]
    a.tag = a.tag or f"{a.device}{'_tiny' if small else ''}"
    return a


def resolve_attn(choice: str, layout: str, device: str) -> str:
    if choice != "auto":
        return choice
    fa2 = importlib.util.find_spec("flash_attn") is not None and device == "cuda"
    if layout == "shared":  # flash-attn varlen cannot express shared prompts
        return "flex_attention" if device == "cuda" else "sdpa"
    if fa2:
        return "flash_attention_2"
    return "flex_attention" if layout == "packed" and device == "cuda" else "sdpa"


def make_groups(n: int, k: int, args: argparse.Namespace, tok) -> list[TokenizedGroup]:
    """n groups of k responses; lengths lognormal with the target mean and sd, then clipped."""
    pm, ps, rm, rs, max_prompt, max_len = LENGTHS["tiny" if args.tiny else "full"]
    vocab = (TINY if args.tiny else FULL)["vocab_size"]
    g = torch.Generator().manual_seed(args.seed)

    def lengths(count: int, mean: float, sd: float) -> list[int]:
        sigma2 = math.log(1 + sd**2 / mean**2)  # lognormal with that mean and sd
        z = torch.randn(count, generator=g, dtype=torch.float64)
        return (z * math.sqrt(sigma2) + math.log(mean) - sigma2 / 2).exp().round().long().tolist()

    def ids(count: int) -> list[int]:  # ordinary tokens only (the specials are 256-259)
        return torch.randint(260, vocab, (count,), generator=g).tolist()

    out = []
    for p_len, r_lens in zip(lengths(n, pm, ps), [lengths(k, rm, rs) for _ in range(n)],
                             strict=True):  # fmt: skip
        prompt = [tok.bos_token_id, *ids(min(max(p_len, 4), max_prompt) - 1)]
        responses = [[*ids(max(r, 1)), tok.eos_token_id][: max_len - len(prompt)] for r in r_lens]
        has_eos = [r[-1] == tok.eos_token_id for r in responses]
        out.append(TokenizedGroup(prompt, responses, has_eos, [float(k - j) for j in range(k)]))
    return out


def data_tokens(groups: list[TokenizedGroup]) -> int:
    """The throughput numerator: each prompt once, plus every response."""
    return sum(len(g.prompt_ids) + sum(map(len, g.response_ids)) for g in groups)


def build_model(args: argparse.Namespace, attn: str, tok):
    shape = TINY if args.tiny else FULL
    config = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    config._attn_implementation = attn
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fresh(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_prefopt(args, groups, layout: str, tok, world) -> dict:
    """The loop's step in this layout: plan, collate, forward_loss, backward, clip, step."""
    _fresh(args.device)
    k = len(groups[0].response_ids)
    attn = resolve_attn(args.attn if layout == "padded" else
                        getattr(args, f"attn_{layout}"), layout, args.device)  # fmt: skip
    model = build_model(args, attn, tok)
    n_params = sum(p.numel() for p in model.parameters())
    if args.compile:
        compile_blocks(model)
    bf16 = args.device == "cuda"
    policy = parallel.shard(model.to(world.device), world, bf16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    spec = get_spec("simpo" if k == 2 else "refa_dynamic")  # SimPO: TRL's simpo, gamma 1.0
    loss_fn = functools.partial(spec.fn, **spec.hparams(spec.config_cls()))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    G, idx = args.pairs_per_step, tuple(range(k))
    ends, positions = [], 0
    _sync(args.device)
    ends.append(time.perf_counter())
    for step in range(args.warmup + args.steps):
        step_groups = [(g, idx) for g in groups[step * G : (step + 1) * G]]
        sizes = [view_size(g, i, layout) for g, i in step_groups]
        plan = plan_micro_batches(sizes, args.token_budget, layout)
        micro = [collate_layout([step_groups[i] for i in mb], tok.pad_token_id, layout)
                 .to(world.device) for mb in plan]  # fmt: skip
        sums = MetricSums()
        for i, batch in enumerate(micro):
            parallel.set_gradient_sync(policy, i == len(micro) - 1)
            with autocast:
                out = forward_loss(policy, None, batch, spec, loss_fn, args.chunk_size)
            out.losses[out.valid].sum().backward()
            sums.add(out, batch.num_tokens)
        valid = max(sums.finish()["valid_groups"], 1)
        for p in policy.parameters():
            if p.grad is not None:
                p.grad.div_(valid)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        ends.append(time.perf_counter())
        if step >= args.warmup:
            positions += sum(b.forward_tokens for b in micro)
    name = f"prefopt {layout}" + (" +compile" if args.compile else "")
    result = _result(args, name, attn, k, groups, ends, n_params, positions,
                     micro_batches=len(plan))  # fmt: skip
    del policy, optimizer, model
    return result


def run_trl(args, groups, tok) -> dict:
    """TRL's CPOTrainer with loss_type=simpo, cpo_alpha=0 (pure SimPO), on the same pairs."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    _fresh(args.device)
    attn = resolve_attn(args.attn, "padded", args.device)
    model = build_model(args, attn, tok)
    n_params = sum(p.numel() for p in model.parameters())
    G, m = args.pairs_per_step, args.trl_micro_pairs
    n = (args.warmup + args.steps) * G
    rows = {"p_ids": [g.prompt_ids for g in groups[:n]],
            "c_ids": [g.response_ids[0] for g in groups[:n]],
            "r_ids": [g.response_ids[1] for g in groups[:n]]}  # fmt: skip

    class IdsCPOTrainer(CPOTrainer):
        """Takes token ids as they are (BOS and EOS included), so both systems see one data."""

        def tokenize_row(self, feature, model=None) -> dict:
            p = feature["p_ids"]
            out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side, key in (("chosen", "c_ids"), ("rejected", "r_ids")):
                seq = p + feature[key]
                out |= {f"{side}_input_ids": seq, f"{side}_attention_mask": [1] * len(seq),
                        f"{side}_labels": [-100] * len(p) + feature[key]}  # fmt: skip
            return out

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, *a, **kw) -> None:
            _sync(args.device)
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **kw) -> None:
            _sync(args.device)
            self.ends.append(time.perf_counter())

    timer = StepEnds()
    with tempfile.TemporaryDirectory() as out_dir:
        config = CPOConfig(
            output_dir=out_dir,
            loss_type="simpo",
            cpo_alpha=0.0,  # no NLL term: pure SimPO
            beta=2.0,
            simpo_gamma=1.0,  # absolute margin, as prefopt's simpo gamma
            per_device_train_batch_size=m,
            gradient_accumulation_steps=G // m,
            max_steps=args.warmup + args.steps,
            learning_rate=1e-6,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            optim="adamw_torch",
            bf16=args.device == "cuda",
            use_cpu=args.device == "cpu",
            max_length=LENGTHS["tiny" if args.tiny else "full"][-1],
            train_sampling_strategy="sequential",  # step i on the same pairs as prefopt's
            gradient_checkpointing=args.gradient_checkpointing,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = IdsCPOTrainer(model=model, args=config, train_dataset=Dataset.from_dict(rows),
                                processing_class=tok, callbacks=[timer])  # fmt: skip
        trainer.train()
    # TRL pads each micro-batch of m pairs to its longest sequence, chosen and rejected alike.
    positions = 0
    for start in range(args.warmup * G, n, m):
        chunk = groups[start : start + m]
        width = max(len(g.prompt_ids) + max(map(len, g.response_ids[:2])) for g in chunk)
        positions += 2 * len(chunk) * width
    result = _result(args, "TRL CPOTrainer simpo", attn, 2, groups, timer.ends, n_params,
                     positions, micro_batches=G // m)  # fmt: skip
    del trainer, model
    return result


def _result(args, name, attn, k, groups, ends, n_params, positions, **extra) -> dict:
    G = args.pairs_per_step
    timed = groups[args.warmup * G : (args.warmup + args.steps) * G]
    step_s = [b - a for a, b in zip(ends, ends[1:], strict=False)][args.warmup :]
    tokens = data_tokens(timed)
    tok_s = tokens / sum(step_s)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    mfu = 6 * n_params * tok_s / args.peak_flops if args.peak_flops else None
    r = dict(system=name, attn=attn, k=k, tokens_per_s=tok_s, mfu=mfu, peak_mem_gib=peak,
             step_s_median=statistics.median(step_s), timed_steps=len(step_s),
             tokens_per_step=tokens / len(step_s), forward_positions_per_step=positions /
             len(step_s), params=n_params, **extra)  # fmt: skip
    mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a"
    mem_s = f"{peak:.1f} GiB" if peak is not None else "n/a"
    print(f"{name:<28} K={k} {attn:<18} {tok_s:>10.0f} tok/s  MFU {mfu_s:>6}  peak {mem_s}",
          flush=True)  # fmt: skip
    return r


def sharing_savings(groups: list[TokenizedGroup]) -> dict:
    """Forward positions of one pass over ``groups`` per layout (no budget: layout cost alone)."""
    idx = tuple(range(len(groups[0].response_ids)))
    packed = sum(view_size(g, idx, "packed").tokens for g in groups)
    shared = sum(view_size(g, idx, "shared").tokens for g in groups)
    return {"k": len(idx), "packed_positions": packed, "shared_positions": shared,
            "saved_by_sharing": 1 - shared / packed}  # fmt: skip


def source_digest() -> str:
    """Hash of the code measured, since the commit cannot show uncommitted changes."""
    files = [
        "prefopt/stats.py",
        "prefopt/data/packing.py",
        "prefopt/data/collate.py",
        "prefopt/evaluation.py",
        "prefopt/parallel.py",
        "experiments/bench_throughput.py",
    ]
    h = hashlib.sha256()
    for f in files:
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:16]


def head_commit() -> str:
    """HEAD's commit, read from .git (no git process)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    # CPU timings move with whatever else runs on the machine: keep its load beside them.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, load average {load} at the end")  # fmt: skip


def write_results(args, results: list[dict], savings: list[dict]) -> Path:
    import transformers

    trl_version = "not installed"
    if importlib.util.find_spec("trl"):
        import trl

        trl_version = trl.__version__
    report = {
        "label": ("CPU smoke test at a tiny shape: checks the code paths, not H100 throughput"
                  if args.device == "cpu" else "GPU measurement"),
        "commit": head_commit(), "source_sha256": source_digest(), "device": device_name(
            args.device), "command": " ".join(["python", *sys.argv]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl_version},
        "settings": {k: v for k, v in vars(args).items()},
        "model": TINY if args.tiny else FULL, "lengths": LENGTHS["tiny" if args.tiny else "full"],
        "results": results, "sharing": savings,
    }  # fmt: skip
    out = ROOT / "experiments" / "results" / f"throughput_{args.tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Throughput: {args.tag}", "", f"**{report['label']}**", "",
             f"- device: {report['device']}", f"- commit: {report['commit']} (sources sha256 "
             f"{report['source_sha256']})", f"- command: `{report['command']}`",
             f"- versions: {report['versions']}", f"- groups per step {args.pairs_per_step}, "
             f"timed steps {args.steps} after {args.warmup} warm-up, prefopt token budget "
             f"{args.token_budget}, TRL micro-batch {args.trl_micro_pairs} pairs", "",
             "| system | K | attention | tokens/s | MFU | peak GPU mem | step (s) | "
             "tokens/step | forward positions/step |", "|---" * 9 + "|"]  # fmt: skip
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['system']} | {r['k']} | {r['attn']} | {r['tokens_per_s']:.0f} | "
                     f"{mfu} | {mem} | {r['step_s_median']:.3f} | {r['tokens_per_step']:.0f} | "
                     f"{r['forward_positions_per_step']:.0f} |")  # fmt: skip
    lines += ["", "Tokens count each prompt once plus every response. Sharing prompts saves:", ""]
    lines += [f"- K={s['k']}: {s['saved_by_sharing']:.1%} of forward positions "
              f"({s['packed_positions']} packed -> {s['shared_positions']} shared)"
              for s in savings]  # fmt: skip
    if args.device == "cpu":
        lines += [
            "",
            "At this shape fixed per-micro-batch costs (FSDP2 hooks, checkpointed "
            "log-prob chunks, Python collation) outweigh the arithmetic, so tokens/s says "
            "nothing about the GPU; the forward-positions column (padding and repeated "
            "prompts) is what the layouts change. MFU and memory need the GPU run.",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is visible (use --device cpu --tiny)")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    tok = tiny_tokenizer()  # pad/BOS/EOS ids only: the data are token ids already
    n = (args.warmup + args.steps) * args.pairs_per_step
    groups4 = make_groups(n, 4, args, tok)
    groups2 = [TokenizedGroup(g.prompt_ids, g.response_ids[:2], g.has_eos[:2], g.scores[:2])
               for g in groups4]  # fmt: skip
    results = []
    if args.skip_trl:
        print("TRL skipped (--skip-trl)")
    elif importlib.util.find_spec("trl") is None:
        print("TRL skipped: not installed (pip install trl)")
    else:
        try:  # first, before prefopt creates its process group
            results.append(run_trl(args, groups2, tok))
        except Exception as e:  # noqa: BLE001  (a TRL failure must not lose prefopt's numbers)
            print(f"TRL skipped: {type(e).__name__}: {e}")
    world = parallel.init_distributed(args.device)
    for layout in filter(None, args.layouts.split(",")):
        results.append(run_prefopt(args, groups2, layout, tok, world))
    for layout in filter(None, args.k4_layouts.split(",")):
        results.append(run_prefopt(args, groups4, layout, tok, world))
    savings = [sharing_savings(groups2), sharing_savings(groups4)]
    for s in savings:
        print(f"K={s['k']}: sharing prompts saves {s['saved_by_sharing']:.1%} of forward positions")
    print(f"wrote {write_results(args, results, savings)}.{{json,md}}")
    parallel.destroy()


if __name__ == "__main__":
    main()
