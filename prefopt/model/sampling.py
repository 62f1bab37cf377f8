"""Batched generation from token ids: left padding, explicit decoding settings, cut at EOS.

One function serves benchmark outputs (``prefopt.eval.generate``), on-policy datasets
(``prefopt.eval.datagen``) and SPO's on-policy KL samples, so all of them stop, pad and seed alike.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


def decoding_config(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    eos_ids: list[int],
    pad_id: int,
) -> GenerationConfig:
    """A complete GenerationConfig, so the model's own generation_config.json (a Hub model may
    ship temperature 0.2, top_p 0.9, ...) never changes what the recorded settings say."""
    if num_samples > 1 and not do_sample:
        raise ValueError("generation.num_samples > 1 needs generation.do_sample=true")
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k or None) if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_samples,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        **sampling,
    )


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel, prompts: list[list[int]], config: GenerationConfig
) -> list[list[list[int]]]:
    """For each prompt, ``config.num_return_sequences`` responses; each ends at its first EOS
    (kept) or after ``max_new_tokens`` tokens. Prompts are left-padded so every one ends where
    generation starts."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)
    model.train(was_training)
    eos = set(config.eos_token_id)
    k = config.num_return_sequences
    rows = []
    for row in out[:, width:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return [rows[i * k : (i + 1) * k] for i in range(len(prompts))]


def eos_ids(tok: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config adds (Llama 3's <|eot_id|>)."""
    extra = model.generation_config.eos_token_id if model.generation_config else None
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys([tok.eos_token_id, *extra]))
