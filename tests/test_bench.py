# pytest tests/test_bench.py -q
"""The throughput benchmark measures the recipe the entrypoint runs (trainer=gpu)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import bench_throughput as bench  # noqa: E402

from prefopt.model.attention import AUTO, Target  # noqa: E402


def test_benchmark_composes_the_gpu_recipe():
    args = SimpleNamespace(
        shape="1b", device="cuda", token_budget=None, pairs_per_step=64, override=[]
    )
    cfg = bench.compose_recipe(args, bench.RUNS["shared-dpo"])
    t = cfg.trainer
    # conf/trainer/gpu.yaml's values and the model config's, not the benchmark's own
    assert (t.micro_batch_tokens, t.logps_chunk_size, t.precision) == (16384, 4096, "auto")
    assert (t.layout, t.global_batch_groups, cfg.loss.name) == ("shared", 64, "dpo")
    assert cfg.model.name_or_path == "meta-llama/Llama-3.2-1B-Instruct"
    assert cfg.model.gradient_checkpointing  # every GPU recipe checkpoints; so does the bench
    assert cfg.model.attn_implementation == "auto"
    assert Target.of_trainer(t, "cuda") == Target("cuda", "shared", half=True)


def test_one_row_per_kernel_and_k():
    """The shared layout once per prefopt kernel that can run on CUDA and once with auto, each
    at K = 2 and K = 4; padded, packed and TRL beside them."""
    kernels = {(r.kernel, r.k) for r in bench.RUNS.values() if r.layout == "shared"}
    assert {(k, n) for k in (*AUTO[:3], "auto") for n in (2, 4)} <= kernels
    for name in AUTO[:3]:  # a row's kernel reaches the composed config
        run = next(r for r in bench.RUNS.values() if r.kernel == name)
        args = SimpleNamespace(
            shape="1b", device="cuda", token_budget=None, pairs_per_step=8, override=[]
        )
        assert bench.compose_recipe(args, run).model.attn_implementation == name
    assert {"trl", "padded", "packed", "padded-k4", "packed-k4", "trl-dpo"} <= set(bench.RUNS)


def test_tokens_are_counted_both_ways(tok):
    groups = bench.make_groups(3, 2, SimpleNamespace(lengths="tiny", shape="tiny", seed=0), tok)
    once, per_pair = bench.token_counts(groups)
    prompts = sum(len(g.prompt_ids) for g in groups)
    assert per_pair - once == prompts  # K = 2: the prompt once more per group
