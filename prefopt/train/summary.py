"""What a finished run reports and leaves behind: the held-out before/after table with its verdict,
the best evaluation, the final export in Hugging Face format, and the facts summary.json records
(the commit, each rank's peak memory)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from prefopt.model import adapters, parallel
from prefopt.model.logprobs import StatsModel
from prefopt.train.banner import verdict


def print_eval(title: str, before: dict[str, float] | None, after: dict[str, float] | None) -> None:
    """Held-out metrics side by side (only one column when the run had no "before")."""
    if before is None:
        before, after = after, None
    keys = [
        "loss",
        "rewards/accuracy",
        "rewards/margin",
        "avg_logps/chosen",
        "avg_logps/rejected",
        "lengths/chosen",
        "lengths/rejected",
        "valid_groups",
    ]
    lines = [f"{title:<22}{'before':>12}" + (f"{'after':>12}" if after else "")]
    for k in keys:
        row = f"{k:<22}{before.get(k, math.nan):>12.4f}"
        lines.append(row + (f"{after.get(k, math.nan):>12.4f}" if after else ""))
    if after:
        lines.append(verdict(before, after))
    print("\n".join(lines), flush=True)


def best_of(*evals: dict[str, float] | None) -> dict[str, float] | None:
    """The eval with the lowest held-out loss (the latest on ties)."""
    done = [m for m in evals if m]
    return min(reversed(done), key=lambda m: m["loss"]) if done else None


def export(
    policy: StatsModel, tok: PreTrainedTokenizerBase, path: Path, merged: bool = False
) -> None:
    """Hugging Face format (``from_pretrained``-able) gathered from the shards onto rank 0.
    LoRA: the adapter in PEFT format, and with ``merged`` the merged model in ``<path>_merged``."""
    if adapters.is_adapted(policy):  # LoRA
        merged_path = path.with_name(f"{path.name}_merged") if merged else None
        adapters.export(policy, tok, path, merged_path, parallel.is_main())
        return
    full = parallel.full_state_dict(policy)  # a collective: every rank takes part
    if parallel.is_main():
        policy.model.save_pretrained(path, state_dict=full)
        tok.save_pretrained(path)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """This process's peak host memory (resident set) and, on a GPU, peak allocated memory."""
    import resource

    out = {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if device.type == "cuda":
        out["gpu_allocated"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return out
