"""Checks of the sharded training path that run the same on 1 rank (in-process, from tests) and on
N gloo ranks (``python -m torch.distributed.run --nproc_per_node 2 tests/scale_checks.py skip``).

Each check raises AssertionError on failure and prints ``ok <name>`` on rank 0 when it passes.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import REPO, arithmetic_rows, write_jsonl  # noqa: E402

import prefopt.losses  # noqa: E402,F401  (registers loss schemas)
from prefopt.data.collate import views_at  # noqa: E402
from prefopt.losses import build_loss  # noqa: E402
from prefopt.model import parallel  # noqa: E402
from prefopt.model.load import empty_model, initial_weights, load_tokenizer, model_config  # noqa: E402
from prefopt.train.setup import prepare_data  # noqa: E402
from prefopt.train.step import (  # noqa: E402
    LossContext,
    StepContext,
    step_micro_batches,
    train_step,
)


def compose_cfg(tmp: Path, *overrides: str):
    tmp.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(tmp / "train.jsonl", arithmetic_rows(16, seed=0))
    eval_ = write_jsonl(tmp / "eval.jsonl", arithmetic_rows(4, seed=1))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "model=tiny",
                "trainer=debug",
                "~experiment",
                f"dataset.path={train}",
                f"dataset.eval_path={eval_}",
                f"hydra.run.dir={tmp / 'run'}",
                f"run_dir={tmp / 'run'}",
                f"cache_dir={tmp / 'cache'}",
                *overrides,
            ],
        )


def sharded_policy(cfg, world, precision, trainable: bool = True):
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    model = empty_model(cfg.model, model_config(cfg.model, cfg.cache_dir, tok))
    wrapper = parallel.shard(model, world, precision, trainable=trainable)
    parallel.load_weights(wrapper, initial_weights(cfg.model, cfg.cache_dir, tok, cfg.seed))
    return wrapper, tok


def full_grads(model) -> list[torch.Tensor]:
    return [
        (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        for p in model.parameters()
    ]


def skip_check(tmp: Path) -> None:
    """Step 1 has a NaN loss in the second micro-batch (on the last rank only); it is skipped.
    Step 2's gradients must equal those of a fresh model that only ever ran step 2."""
    cfg = compose_cfg(
        tmp,
        "loss=simpo",
        "trainer.global_batch_groups=8",
        "trainer.micro_batch_groups=2",
        "trainer.max_grad_norm=1e9",
    )
    world = parallel.init_distributed("cpu")
    precision = parallel.resolve_precision(world.device, "fp32", "float32")
    spec, loss_fn = build_loss(cfg.loss)
    calls = {"n": 0}

    def poisoned(policy, ref, scores, **kw):
        out = loss_fn(policy, ref, scores, **kw)
        calls["n"] += 1
        if calls["n"] == 2 and world.rank == world.world_size - 1:
            return out._replace(losses=out.losses * float("nan"))
        return out

    def step(model, tok, views, fn):
        data = prepare_data(cfg, tok, spec)
        mbs = step_micro_batches(cfg.trainer, data, views, world, tok.pad_token_id)
        assert len(mbs) >= 2
        ctx = StepContext(
            LossContext(spec, fn, 64), contextlib.nullcontext(), cfg.trainer.max_grad_norm
        )
        return train_step(model, None, mbs, ctx)

    step1, step2 = views_at(16, 0, 0, 8), views_at(16, 0, 8, 8)
    model, tok = sharded_policy(cfg, world, precision)
    first = step(model, tok, step1, poisoned)
    assert not first.applied, first.metrics
    model.zero_grad(set_to_none=True)  # what the loop does after every step
    second = step(model, tok, step2, loss_fn)
    assert second.applied
    got = full_grads(model)
    fresh, _ = sharded_policy(cfg, world, precision)
    clean = step(fresh, tok, step2, loss_fn)
    want = full_grads(fresh)
    assert second.metrics["grad_norm"] == clean.metrics["grad_norm"], (
        second.metrics["grad_norm"],
        clean.metrics["grad_norm"],
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if parallel.is_main():
        print("ok skip", flush=True)


def fsdp_gradient_bytes(model) -> tuple[int, int]:
    """Gradient bytes this rank holds, by tensor: (unsharded, sharded). Unsharded: what FSDP2
    keeps per parameter between micro-batches without gradient sync (its fp32 accumulator when
    the compute dtype differs from the reduce dtype, else the unsharded parameter's .grad);
    sharded: the local shards of the parameters' .grad."""
    from torch.distributed.fsdp import FSDPModule

    unsharded = 0
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [m._get_fsdp_state()._fsdp_param_group for m in modules]
    for group in (g for g in groups if g is not None):
        for fsdp_param in group.fsdp_params:
            grad = fsdp_param.unsharded_accumulated_grad
            if grad is None:
                grad = getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None)
            unsharded += 0 if grad is None else grad.numel() * grad.element_size()
    sharded = sum(
        p.grad.to_local().numel() * p.grad.element_size()
        for p in model.parameters()
        if p.grad is not None
    )
    return unsharded, sharded


def grad_memory_check(tmp: Path) -> None:
    """The memory plan's gradient rows equal the gradient bytes FSDP2 holds, by tensor, for bf16
    and fp32 compute (reduce dtype fp32): with ``trainer.grad_sync=last``, after one micro-batch
    without sync, an unsharded fp32 gradient of every parameter on every rank; after the last
    (synced) one, the sharded gradients only; with ``every``, the sharded ones after each."""
    from prefopt.train.plan import ACCUMULATORS, plan_memory, shape_and_inputs
    from prefopt.train.step import forward_loss

    world = parallel.init_distributed("cpu")
    for compute in ("bf16", "fp32"):
        for sync in ("last", "every"):
            G = 4 * world.world_size  # two micro-batches of 2 groups per rank
            overrides = (f"trainer.precision={compute}", f"trainer.grad_sync={sync}")
            overrides = ("loss=simpo", f"trainer.global_batch_groups={G}", *overrides)
            cfg = compose_cfg(tmp / f"{compute}_{sync}", *overrides)
            plan = plan_memory(*shape_and_inputs(cfg, world.world_size, "cpu"))
            precision = parallel.resolve_precision(world.device, compute, "float32")
            policy, tok = sharded_policy(cfg, world, precision)
            spec, loss_fn = build_loss(cfg.loss)
            data = prepare_data(cfg, tok, spec)
            views = views_at(len(data.train_views), 0, 0, G)
            first, last = step_micro_batches(cfg.trainer, data, views, world, tok.pad_token_id)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16")
            held = []
            for batch, synced in ((first, sync == "every"), (last, True)):
                parallel.set_gradient_sync(policy, synced)
                with autocast:
                    out = forward_loss(policy, None, batch, LossContext(spec, loss_fn, 64))
                out.losses.sum().backward()
                held.append(fsdp_gradient_bytes(policy))
            sharded = plan.rows["gradients (sharded)"]
            if sync == "last":
                assert held[0] == (plan.rows[ACCUMULATORS], 0), (compute, held, plan.rows)
                assert plan.rows[ACCUMULATORS] == 4 * plan.params  # the whole model, any W
            else:
                assert ACCUMULATORS not in plan.rows and held[0] == (0, sharded), (compute, held)
            assert held[1] == (0, sharded), (compute, sync, held, plan.rows)
    if parallel.is_main():
        print("ok grad_memory", flush=True)


if __name__ == "__main__":
    import tempfile

    name = sys.argv[1]
    rank = int(__import__("os").environ.get("RANK", "0"))
    base = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp())
    tmp = base / f"rank{rank}"
    tmp.mkdir(parents=True, exist_ok=True)
    {"skip": skip_check, "grad_memory": grad_memory_check}[name](tmp)
    parallel.destroy()
