# pytest tests/test_recipes.py -q
"""The model picks its recipe (conf/recipe/), explicit choices win, the banner warns, and the
dry run stops before any weight is read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

from prefopt.losses import LOSSES
from prefopt.train.banner import (
    RunFacts,
    format_banner,
    mistakes,
    params_of_config,
    tokens_per_group,
)

CONF = REPO / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
CPU_MODELS = {"smollm2_135m", "tiny", "checkpoint"}  # the demo data and trainer, no W&B
ON_POLICY = {  # instruct models train on their own samples, as the papers do
    "mistral7b_instruct": "princeton-nlp/mistral-instruct-ultrafeedback",
    "llama3_8b_instruct": "princeton-nlp/llama3-ultrafeedback",
    "gemma2_9b_it": "princeton-nlp/gemma2-ultrafeedback-armorm",
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["run_dir=/tmp/x", *overrides], return_hydra_config=True)


def _choices(cfg) -> tuple[str, str, str]:
    c = cfg.hydra.runtime.choices
    return c.dataset, c.trainer, c.logger


def test_headline_command_composes_the_mistral7b_recipe():
    cfg = _compose("loss=refa_dynamic", "model=mistral7b")
    assert _choices(cfg) == ("ultrafeedback", "gpu", "wandb")
    assert (
        cfg.dataset.path == "openbmb/UltraFeedback" and cfg.dataset.score_field == "overall_score"
    )
    assert (cfg.dataset.max_length, cfg.dataset.max_prompt_length) == (1024, 512)
    assert cfg.model.name_or_path == "alignment-handbook/zephyr-7b-sft-full"  # the SFT start
    assert cfg.trainer.global_batch_groups == 128 and cfg.trainer.epochs == 1
    assert cfg.optimizer.lr == 3e-7 and cfg.recipe.name == "mistral7b"
    assert cfg.loss.p == 2.0 and cfg.trainer.train_top_blocks == 0


def test_bare_command_is_the_cpu_demo():
    cfg = _compose()
    assert _choices(cfg) == ("demo", "default", "none")
    assert cfg.model.source == "gguf" and cfg.recipe.name == "smollm2_135m"
    assert Path(cfg.dataset.path).parent == REPO / "prefopt" / "assets"
    # the shipped on-policy samples plus the benchmark's reference answer (a fifth response)
    assert cfg.dataset.schema == "constraints_reference"
    assert cfg.optimizer.lr == cfg.recipe.lr == 3e-4 and cfg.trainer.train_top_blocks == 4
    assert (cfg.trainer.max_steps, cfg.trainer.global_batch_groups) == (24, 8)  # ~1 epoch of 198
    assert cfg.trainer.layout == "shared" and cfg.model.attn_implementation == "auto"
    assert _compose("model=tiny").trainer.layout == "padded"  # the demo's speed choices: SmolLM2's


@pytest.mark.parametrize("model", MODELS)
def test_every_model_has_a_recipe(model):
    cfg = _compose(f"model={model}", "model.name_or_path=some/dir")  # checkpoint needs a path
    assert cfg.recipe.name == model
    dataset, trainer, logger = _choices(cfg)
    if model in CPU_MODELS:  # the embedded default's own data adds the reference answers
        assert (trainer, logger) == ("default", "none")
        assert dataset == ("demo" if model == "smollm2_135m" else "default")
    else:
        assert (trainer, logger) == ("gpu", "wandb") and cfg.dataset.schema != "canonical"
        assert 3e-7 <= cfg.optimizer.lr <= 1e-6  # the papers' range
    if model in ON_POLICY:
        assert cfg.dataset.path == ON_POLICY[model]


def test_explicit_choices_and_values_beat_the_recipe():
    cfg = _compose(
        "model=mistral7b",
        "dataset=ultrafeedback_binarized",
        "trainer=debug",
        "logger=none",
        "optimizer.lr=1e-6",
        "dataset.max_length=512",
    )
    assert _choices(cfg) == ("ultrafeedback_binarized", "debug", "none")
    assert cfg.dataset.path == "HuggingFaceH4/ultrafeedback_binarized"
    assert cfg.trainer.global_batch_groups == 4 and cfg.optimizer.lr == 1e-6
    assert cfg.dataset.max_length == 512 and cfg.recipe.lr == 3e-7  # the banner compares these


def test_the_loss_brings_its_published_values_for_the_model():
    cfg = _compose("model=mistral7b", "loss=simpo")
    assert (cfg.loss.beta, cfg.loss.gamma, cfg.optimizer.lr) == (2.0, 1.6, 3e-7)
    cfg = _compose("model=mistral7b", "loss=swepo")  # SWEPO states lr 5e-7, not SimPO's 3e-7
    assert cfg.optimizer.lr == 5e-7
    cfg = _compose("model=mistral7b", "loss=simpo", "loss.gamma=0.5")
    assert cfg.loss.gamma == 0.5


def test_loss_recipe_files_name_a_loss_and_a_model():
    # optional defaults are skipped silently when absent: a misspelt file would never apply
    for path in (CONF / "recipe" / "loss").glob("*.yaml"):
        pairs = [
            (loss, path.stem[len(loss) + 1 :])
            for loss in LOSSES
            if path.stem.startswith(loss + "_")
        ]
        assert any(model in MODELS for _, model in pairs), path.name


# The pinned paper runs (conf/experiment/) whose data matches the model's recipe
# (or differs only in pairing): the recipe must give the same loss values and lr.
PINNED = {
    "refa_mistral7b_base": ("mistral7b", "refa_dynamic"),
    "swepo_mistral7b_base": ("mistral7b", "swepo"),
    "swepo_llama3_8b_base": ("llama3_8b", "swepo"),
    "simpo_mistral_base": ("mistral7b", "simpo"),
    "simpo_mistral_instruct": ("mistral7b_instruct", "simpo"),
    "simpo_llama3_base": ("llama3_8b", "simpo"),
    "simpo_llama3_instruct": ("llama3_8b_instruct", "simpo"),
    "lmpo_mistral_base": ("mistral7b", "lmpo"),
    "lmpo_mistral_instruct": ("mistral7b_instruct", "lmpo"),
    "lmpo_llama3_base": ("llama3_8b", "lmpo"),
    "lmpo_llama3_instruct": ("llama3_8b_instruct", "lmpo"),
    "alpha_dpo_mistral7b_instruct": ("mistral7b_instruct", "alpha_dpo"),
    "alpha_dpo_llama3_8b_instruct": ("llama3_8b_instruct", "alpha_dpo"),
    "alpha_dpo_gemma2_9b_it": ("gemma2_9b_it", "alpha_dpo"),
}


@pytest.mark.parametrize("experiment", sorted(PINNED))
def test_recipe_matches_the_pinned_paper_run(experiment):
    model, loss = PINNED[experiment]
    pinned, recipe = (
        _compose(f"experiment={experiment}"),
        _compose(f"model={model}", f"loss={loss}"),
    )
    assert recipe.loss == pinned.loss and math.isclose(recipe.optimizer.lr, pinned.optimizer.lr)
    assert recipe.model == pinned.model
    assert recipe.dataset.max_length == pinned.dataset.max_length
    assert recipe.trainer == pinned.trainer and recipe.seed == pinned.seed


def test_sweeps_log_to_wandb():
    for path in (CONF / "sweep").glob("*.yaml"):
        assert _choices(_compose(f"+sweep={path.stem}"))[2] == "wandb", path.name


def test_cpu_demo_experiment_puts_any_model_on_the_demo():
    cfg = _compose("model=llama3_2_1b", "experiment=cpu_demo")
    assert _choices(cfg) == ("default", "default", "none") and cfg.optimizer.lr == 1e-5


# ---- banner ----


def _facts(**kw) -> RunFacts:
    base = dict(
        model="m",
        params=135_000_000,
        trainable="all",
        recipe="mistral7b",
        data="canonical: x.jsonl",
        train_groups=60_000,
        eval_groups=1000,
        dropped=0,
        truncated=0,
        k=4,
        pairs="all K responses per group",
        steps=468,
        epochs=1.0,
        groups_per_step=128,
        tokens_per_step=200_000,
        world_size=8,
        devices="8 x NVIDIA H100",
        precision="bf16 autocast",
        master_dtype="float32",
        layout="packed",
        attention="sdpa",
        reference="none",
        lr=3e-7,
        recipe_lr=3e-7,
        run_dir="outputs/x",
        logger="W&B offline",
    )
    return RunFacts(**{**base, **kw})


def test_a_sane_run_has_no_warning():
    assert mistakes(_facts()) == []


def test_banner_warns_on_a_7b_model_on_cpu():
    (w,) = mistakes(_facts(params=7_241_732_096, devices="cpu (2 cores, 2 torch threads)"))
    assert "7.24B parameters" in w and "CPU" in w
    assert mistakes(_facts(params=7_241_732_096)) == []  # the same model on GPUs


def test_banner_warns_on_a_10x_learning_rate():
    (w,) = mistakes(_facts(lr=3e-6))  # 10 x the recipe's 3e-7
    assert "optimizer.lr=3e-06 is 10x the mistral7b recipe's 3e-07" in w
    assert mistakes(_facts(lr=2.9e-6)) == []  # 9.7x: a deliberate choice, not a typo
    assert len(mistakes(_facts(lr=3e-8))) == 1  # 10x too small is as suspicious
    assert mistakes(_facts(lr=1.0, recipe_lr=None)) == []  # no recipe: nothing to compare


def test_banner_warns_when_the_steps_cover_the_data_many_times():
    (w,) = mistakes(_facts(steps=1000, groups_per_step=128, train_groups=198, epochs=646.5))
    assert "646.5 passes over only 198 training groups" in w


def test_banner_lists_the_facts_and_the_memory_plan():
    text = format_banner(_facts(lr=3e-6), mistakes(_facts(lr=3e-6)))
    assert "lr 3e-06 (recipe 3e-07)" in text and "memory     no plan" in text
    assert text.count("WARNING:") == 1
    plan = "params 14.5 GB + grads 29 GB + Adam 58 GB over 8 ranks: 12.7 GB per GPU"
    assert plan in format_banner(_facts(plan=plan), [])


def test_tokens_per_group_counts_the_prompt_once_per_response_or_once():
    import datasets

    data = datasets.Dataset.from_dict(
        {"prompt_ids": [[1, 2, 3]], "response_ids": [[[4, 5], [6, 7, 8, 9]]]}
    )
    assert tokens_per_group(data, "padded", [(0, (0, 1))]) == 3 + 2 + 3 + 4
    assert tokens_per_group(data, "shared", [(0, (0, 1))]) == 3 + 2 + 4
    assert tokens_per_group(data, "packed", [(0, (1,))]) == 3 + 4  # a pairwise view's slots


def test_parameter_count_from_the_config_alone():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        tie_word_embeddings=True,
    )
    # embedding 100 x 8 (tied with the head) + final norm 8 + per block: q 8x8, k 8x4, v 8x4,
    # o 8x8, gate/up/down 3 x 8x16, two norms 2 x 8  (head dim 4, one KV head)
    block = 64 + 32 + 32 + 64 + 3 * 128 + 16
    assert params_of_config(config, "meta") == 800 + 8 + 2 * block


# ---- dry run ----


def test_dry_run_exits_before_any_weight_is_read(tmp_path, tiny_data, monkeypatch, capsys):
    """A model directory with a tokenizer and config.json but no weight file, and a loader that
    fails if called: the dry run prints the banner and the first batch and returns."""
    import prefopt.train.setup
    from prefopt.config import TinyModelConfig
    from prefopt.model import parallel
    from prefopt.model.load import tiny_llama_config, tiny_tokenizer
    from prefopt.train.loop import run

    model_dir = tmp_path / "model"
    tok = tiny_tokenizer()
    tok.save_pretrained(model_dir)
    tiny_llama_config(TinyModelConfig(), tok).save_pretrained(model_dir)

    def no_weights(*args, **kwargs):
        raise AssertionError("the dry run loaded model weights")

    monkeypatch.setattr(prefopt.train.setup, "load_model", no_weights)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"run_dir={tmp_path / 'run'}",
                f"cache_dir={tmp_path / 'cache'}",
                "model=checkpoint",
                f"model.name_or_path={model_dir}",
                "trainer=debug",
                "trainer.dry_run=true",
                f"dataset.path={tiny_data[0]}",
                f"dataset.eval_path={tiny_data[1]}",
                "optimizer.lr=1e-4",
            ],
        )
    assert run(cfg) == {}
    parallel.destroy()
    assert sorted(p.name for p in model_dir.iterdir() if "safetensors" in p.name) == []
    out = capsys.readouterr().out
    assert "input_ids" in out and "no weights loaded" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "dry_run" and summary["warnings"] == []
    facts = summary["banner"]
    assert facts["params"] == 90_688  # the tiny Llama: see test_parameter_count_from_the_config
    assert (facts["train_groups"], facts["eval_groups"], facts["k"]) == (24, 8, 4)
    assert facts["steps"] == 3 and facts["logger"].startswith("off")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_verdict_reads_the_accuracy_change():
    from prefopt.train.banner import verdict

    up = verdict({"rewards/accuracy": 0.5893}, {"rewards/accuracy": 0.7143})
    assert "58.9% -> 71.4% (+12.5 points), learned" in up
    assert "no clear change" in verdict({"rewards/accuracy": 0.5893}, {"rewards/accuracy": 0.6})
    assert "got worse" in verdict({"rewards/accuracy": 0.7}, {"rewards/accuracy": 0.5})


def test_train_top_blocks_freezes_everything_below():
    from transformers import AutoModelForCausalLM

    from prefopt.config import TinyModelConfig
    from prefopt.model.blocks import freeze_below_top_blocks
    from prefopt.model.load import tiny_llama_config, tiny_tokenizer

    model = AutoModelForCausalLM.from_config(tiny_llama_config(TinyModelConfig(), tiny_tokenizer()))
    assert freeze_below_top_blocks(model, 1) == 36_992 + 64  # block 1 and the final norm (64)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in trainable)
    assert not model.get_input_embeddings().weight.requires_grad  # tied to the output layer
    with pytest.raises(ValueError, match="only 2 decoder blocks"):
        freeze_below_top_blocks(model, 3)
