# .venv/bin/pytest tests/test_extras.py -q
"""Step extras: the table the registry's names resolve to, and a toy loss with a toy extra
registered here trains through ``train_step`` and the loop (its input reaches the loss, its
regularizer's gradient the parameters, its state survives a resume)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_train import _cfg, _metrics

from prefopt.losses import LOSSES, build_loss, get_spec
from prefopt.losses.common import has_preference
from prefopt.losses.registry import LossConfig, register_loss
from prefopt.model.logprobs import StatsModel
from prefopt.train.extras import (
    EXTRAS,
    ExtraEnv,
    StepExtra,
    StepExtras,
    StepRows,
    extra_classes,
    reference_model_needed,
)
from prefopt.train.step import LossContext, StepContext, train_step
from prefopt.types import LossOutput

# ----------------------------------------------------------------------------------------------
# The table and the declarations
# ----------------------------------------------------------------------------------------------


def test_every_declared_extra_is_in_the_table():
    declared = {n: s.extras for n, s in LOSSES.items() if s.extras}
    assert declared == {"kto": ("mismatched_kl",), "spo": ("on_policy_kl",)}
    for name in declared:
        extra_classes(get_spec(name))  # raises on an unknown name or a missing config field
    assert EXTRAS["mismatched_kl"].input_names == ("kl_estimate",)
    assert EXTRAS["on_policy_kl"].input_names == ()
    assert set(EXTRAS["on_policy_kl"].config_fields) == {
        "kl_weight",
        "kl_every",
        "kl_num_samples",
        "kl_max_new_tokens",
    }


def test_reference_model_needed_by_extras():
    kto, spo, dpo = get_spec("kto"), get_spec("spo"), get_spec("dpo")
    kto_cfg, spo_cfg = kto.config_cls(), spo.config_cls()
    assert reference_model_needed(kto, kto_cfg, "precompute")  # mismatched pairs: no cache rows
    assert reference_model_needed(spo, spo_cfg, "precompute")  # kl_weight 0.1: the samples
    assert not reference_model_needed(spo, spo.config_cls(kl_weight=0.0), "model")
    assert not reference_model_needed(spo, spo_cfg, "model", training=False)  # no KL in eval
    assert reference_model_needed(kto, kto_cfg, "model", training=False)  # eval's kl_estimate
    assert reference_model_needed(dpo, dpo.config_cls(), "model")
    assert not reference_model_needed(dpo, dpo.config_cls(), "precompute")


@dataclass
class _NoKL(LossConfig):
    name: str = "no_kl"


def test_unknown_extra_or_missing_field_is_named(monkeypatch):
    def fn(policy, ref, scores):
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="tuple of names"):
        register_loss("no_kl", _NoKL, extras="on_policy_kl")
    try:
        register_loss("no_kl", _NoKL, extras=("nope", "on_policy_kl"))(fn)
        with pytest.raises(KeyError, match="declares extra 'nope'.*'mismatched_kl'"):
            extra_classes(get_spec("no_kl"))
        monkeypatch.setitem(EXTRAS, "nope", StepExtra)
        with pytest.raises(TypeError, match=r"'on_policy_kl' reads loss config fields \['kl_"):
            extra_classes(get_spec("no_kl"))
    finally:
        LOSSES.pop("no_kl", None)


# ----------------------------------------------------------------------------------------------
# A toy loss with a toy extra, through train_step and the loop
# ----------------------------------------------------------------------------------------------


@dataclass
class ToyConfig(LossConfig):
    name: str = "toy_extras"
    weight: float = 0.5  # read by the toy extra (its regularizer's weight), not by the loss


def toy_loss(policy, ref, scores, *, step_views):
    """Zero loss (no gradient from the groups); reports the extra's input as a metric."""
    valid = has_preference(scores, policy.mask)
    losses = 0.0 * policy.logps.sum(-1)  # (B,)
    return LossOutput(losses, valid, {"toy/step_views": step_views.expand_as(losses)})


class ToyExtra(StepExtra):
    """Input: the number of views the step covers. Regularizer: weight x sum of the final norm's
    weights (gradient = weight on each of them); its state counts the steps it ran."""

    input_names = ("step_views",)
    config_fields = ("weight",)

    def __init__(self, loss_cfg, env: ExtraEnv) -> None:
        super().__init__(loss_cfg, env)
        self.weight = loss_cfg.weight

    def inputs(self, policy, rows: StepRows) -> dict[str, torch.Tensor]:
        return {"step_views": torch.tensor(float(len(rows.order)), dtype=torch.float64)}

    def regularizer(self, policy, rows: StepRows, state):
        state["calls"] = state.get("calls", 0) + 1
        norm = policy.model.model.norm.weight

        def regularize() -> torch.Tensor:
            local = norm.to_local() if hasattr(norm, "to_local") else norm  # sharded: 1 rank
            value = self.weight * local.sum()
            value.backward()
            return value.detach()

        return regularize


@pytest.fixture
def toy(monkeypatch):
    LOSSES.pop("toy_extras", None)
    register_loss("toy_extras", ToyConfig, extras=("toy",))(toy_loss)
    monkeypatch.setitem(EXTRAS, "toy", ToyExtra)
    yield get_spec("toy_extras")
    LOSSES.pop("toy_extras", None)


def _toy_cfg(run_dir: Path, data, *overrides: str):
    cfg = _cfg(run_dir, data, "loss=simpo", *overrides)
    cfg.loss = OmegaConf.structured(ToyConfig())
    return cfg


def test_toy_extra_input_reaches_the_loss_and_its_gradient_the_parameters(tmp_path, tiny_data, toy):
    from prefopt.data.batching import Batching, batches
    from prefopt.model.load import load_model, load_tokenizer
    from prefopt.train.passes import PassOptions
    from prefopt.train.setup import prepare_data

    cfg = _toy_cfg(tmp_path / "r", tiny_data)
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    spec, loss_fn = build_loss(cfg.loss)
    assert spec is toy and loss_fn.keywords == {}  # ``weight`` is the extra's, not the loss's
    data = prepare_data(cfg, tok, spec)
    model = load_model(cfg.model, cfg.cache_dir, tok, seed=0)
    policy = StatsModel(model)
    opts = PassOptions(4, tok.pad_token_id, 1024, contextlib.nullcontext())
    extras = StepExtras.build(spec, cfg.loss, ExtraEnv(None, opts, tok.eos_token_id))
    views, state = [0, 1, 2], {}
    rows = StepRows(data.train, data.train_views, views)
    mbs = list(batches(data.train, data.train_views, views, 2, Batching(pad_id=tok.pad_token_id)))
    loss = LossContext(spec, loss_fn, 1024, inputs=extras.inputs(policy, rows))
    regularizer = extras.regularizer(policy, rows, state)
    ctx = StepContext(loss, contextlib.nullcontext(), 1e9, regularizer=regularizer)
    result = train_step(policy, None, mbs, ctx)
    assert result.applied and state == {"toy": {"calls": 1}}
    assert result.metrics["toy/step_views"] == 3.0  # every group of the step got len(order)
    assert result.metrics["valid_groups"] == 3
    hidden = cfg.model.tiny.hidden_size
    assert result.metrics["regularizer"] == 0.5 * hidden  # the norm's weights start at 1
    norm = model.model.norm.weight
    # added after the normalisation by the 3 valid groups: 0.5 itself, not 0.5 / 3
    torch.testing.assert_close(norm.grad, torch.full((hidden,), 0.5), rtol=0, atol=0)
    others = [p.grad for p in model.parameters() if p is not norm and p.grad is not None]
    assert others and all(not g.any() for g in others)  # the zero loss adds no gradient


def test_toy_extra_runs_in_the_loop_and_its_state_survives_a_resume(tmp_path, tiny_data, toy):
    from prefopt.train.loop import run

    run_dir = tmp_path / "run"
    assert run(_toy_cfg(run_dir, tiny_data, "trainer.stop_at_step=2")) == {}
    state = torch.load(run_dir / "checkpoints/step_000002/train_state.pt", weights_only=False)
    assert state["extra_state"] == {"toy": {"calls": 2}}
    final = run(_toy_cfg(run_dir, tiny_data))  # resume=auto: steps 3 of 3
    state = torch.load(run_dir / "checkpoints/step_000003/train_state.pt", weights_only=False)
    assert state["extra_state"] == {"toy": {"calls": 3}}  # 1 had it restarted from nothing
    train = [m for m in _metrics(run_dir) if "train/loss" in m]
    assert [m["train/toy/step_views"] for m in train] == [4.0, 4.0, 4.0]  # global_batch_groups
    hidden = _toy_cfg(run_dir, tiny_data).model.tiny.hidden_size
    assert train[0]["train/regularizer"] == 0.5 * hidden  # before any update: weights of 1
    assert train[1]["train/regularizer"] < 0.5 * hidden  # Adam moved them against the gradient
    assert final["toy/step_views"] == 8.0  # the evaluation pass: all 8 held-out views
