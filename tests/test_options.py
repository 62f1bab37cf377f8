# .venv/bin/pytest tests/test_options.py -q
"""Every option of the optimizer group, trainer.layout, trainer.reference, trainer.master_dtype,
trainer.precision, trainer.grad_sync and model.lora trains 3 steps through ``python -m
prefopt.train`` on the tiny model, and the weights move. Optimizer x layout x world size is covered
pairwise (DESIGN: all 9 optimizer-layout pairs, each optimizer and each layout on 1 and on 2 gloo
ranks); the other options ride along, each value at least once. 1 rank runs in-process (the entry
module through runpy), 2 ranks through torchrun. QLoRA (model.quantize, bitsandbytes) needs CUDA:
tests/gpu/test_options_gpu.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, checkpoint_weights
from doc_commands import free_port, run_module
from omegaconf import OmegaConf

from prefopt.config import ModelConfig
from prefopt.model.load import load_model, tiny_tokenizer

BF16_MASTER = ("trainer.master_dtype=bfloat16",)  # what optimizer=adamw_bf16_sr is for
LORA = ("+model/lora=default",)
BF16 = "trainer.precision=bf16"
# (optimizer, layout, ranks, the other options this run covers)
DESIGN = [
    ("adamw", "padded", 1, ("loss=dpo", "trainer.reference=model", "trainer.precision=fp32")),
    ("adamw", "packed", 2, ("loss=dpo", "trainer.reference=precompute")),
    ("adamw", "shared", 1, ("loss=dpo", *LORA, "trainer.grad_sync=last")),
    ("adamw8bit", "padded", 2, ("loss=simpo", "trainer.grad_sync=last")),
    (
        "adamw8bit",
        "packed",
        1,
        ("loss=dpo", "trainer.reference=precompute", "trainer.precision=bf16"),
    ),
    ("adamw8bit", "shared", 1, ("loss=simpo", *LORA)),
    ("adamw_bf16_sr", "padded", 1, ("loss=simpo", *BF16_MASTER, BF16)),
    ("adamw_bf16_sr", "packed", 1, ("loss=dpo", *BF16_MASTER, "trainer.reference=model")),
    ("adamw_bf16_sr", "shared", 2, ("loss=simpo", *BF16_MASTER)),
]


def _id(row) -> str:
    return f"{row[0]}-{row[1]}-{row[2]}rank"


def test_the_design_is_pairwise_and_covers_every_option():
    optimizers = {p.stem for p in (REPO / "conf" / "optimizer").glob("[!_]*.yaml")}
    layouts = {"padded", "packed", "shared"}
    pairs = {(o, l) for o, l, _, _ in DESIGN}  # noqa: E741
    assert pairs == {(o, l) for o in optimizers for l in layouts}  # noqa: E741
    for o in optimizers:
        assert {r for opt, _, r, _ in DESIGN if opt == o} == {1, 2}, o
    for layout in layouts:
        assert {r for _, lay, r, _ in DESIGN if lay == layout} == {1, 2}, layout
    settings = {s for *_, extra in DESIGN for s in extra}
    for key, values in {
        "trainer.reference": ("model", "precompute"),
        "trainer.precision": ("fp32", "bf16"),  # auto (fp32 on CPU) elsewhere
        "trainer.master_dtype": ("bfloat16",),  # float32 elsewhere
        "trainer.grad_sync": ("last",),  # every elsewhere
    }.items():
        assert {f"{key}={v}" for v in values} <= settings, key
    assert LORA[0] in settings


def _initial_weights() -> dict[str, torch.Tensor]:
    """The tiny model every run starts from (seed 0), by checkpoint key."""
    cfg = OmegaConf.structured(ModelConfig(name_or_path="tiny", source="tiny"))
    model = load_model(cfg, "", tiny_tokenizer(), seed=0)
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def _train(tmp_path: Path, data, optimizer: str, layout: str, ranks: int, extra, env) -> Path:
    args = [
        "model=tiny",
        "trainer=debug",  # 3 steps
        f"optimizer={optimizer}",
        "optimizer.lr=1e-3",
        f"trainer.layout={layout}",
        f"dataset.path={data[0]}",
        f"dataset.eval_path={data[1]}",
        *extra,
    ]
    env.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    if ranks == 1:
        result = run_module("prefopt.train", args, tmp_path)
        assert result.code == 0, result.out[-3000:]
        return next((tmp_path / "outputs").rglob("summary.json")).parent
    run_dir = tmp_path / "run"  # one run dir for both ranks (torchrun starts them apart)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
    cmd += [f"--master_port={free_port()}", "-m", "prefopt.train", *args]
    # torchao compiles its step per parameter shape: ~40 s per rank on 2 shared CPU cores. The
    # 2-rank runs check sharding and collectives with each optimizer, eagerly; the compiled step
    # on DTensor shards runs on 1 rank (above, and test_scale.py).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir


def _check_trained(run_dir: Path, ranks: int, lora: bool) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 3 and summary["world_size"] == ranks
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["eval_final"]["loss"])
    final = checkpoint_weights(run_dir, 3)
    if lora:  # the checkpoint holds the adapters: B starts at zero
        b = [v for k, v in final.items() if "lora_B" in k]
        assert b and all(v.abs().sum() > 0 for v in b)
        return
    start = _initial_weights()
    assert set(final) == set(start)
    for key, value in final.items():  # every tensor moved (bf16 master weights: by rounding)
        assert not torch.equal(value.float(), start[key].to(value.dtype).float()), key


def _run(tmp_path, tiny_data, optimizer, layout, ranks, extra, monkeypatch):
    run_dir = _train(tmp_path, tiny_data, optimizer, layout, ranks, extra, monkeypatch)
    _check_trained(run_dir, ranks, LORA[0] in extra)


ONE = [r for r in DESIGN if r[2] == 1]
TWO = [r for r in DESIGN if r[2] == 2]


@pytest.mark.parametrize("optimizer,layout,ranks,extra", ONE, ids=[_id(r) for r in ONE])
def test_option_trains_through_the_entry_point(
    tmp_path, tiny_data, monkeypatch, optimizer, layout, ranks, extra
):
    _run(tmp_path, tiny_data, optimizer, layout, ranks, extra, monkeypatch)


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer,layout,ranks,extra", TWO, ids=[_id(r) for r in TWO])
def test_option_trains_on_two_ranks(
    tmp_path, tiny_data, monkeypatch, optimizer, layout, ranks, extra
):
    _run(tmp_path, tiny_data, optimizer, layout, ranks, extra, monkeypatch)
