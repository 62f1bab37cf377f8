"""The decoder blocks of a causal LM: found once here, then sharded one FSDP2 group each
(``prefopt.model.parallel``), compiled one graph each (``compile_blocks``), or frozen below the top
ones (``freeze_below_top_blocks``, ``trainer.train_top_blocks``).

Freezing: on a CPU the backward pass dominates a step. Freezing the embeddings and the lower
blocks means no activation is kept and no gradient computed below the first trainable block, so
a step costs about one forward plus the backward of the top blocks. The final norm stays
trainable; a tied output layer shares the (frozen) input embedding. Applied to the Hugging Face
model before sharding: FSDP2 accepts groups that mix frozen and trainable parameters.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def decoder_blocks(model: PreTrainedModel, purpose: str) -> list[nn.Module]:
    """The transformer blocks of an HF causal LM (``get_decoder().layers`` for Llama-like ones);
    ``purpose`` (what the caller does with them) names the failure."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found to {purpose}")
    return list(layers)


def freeze_below_top_blocks(model: PreTrainedModel, top_blocks: int) -> int:
    """Leave only the last ``top_blocks`` decoder blocks (and the final norm) trainable.

    ``top_blocks <= 0`` leaves the model untouched. Returns the number of trainable parameters.
    """
    if top_blocks > 0:
        layers = decoder_blocks(model, "freeze (trainer.train_top_blocks)")
        if top_blocks > len(layers):
            raise ValueError(
                f"trainer.train_top_blocks={top_blocks} but the model has only "
                f"{len(layers)} decoder blocks"
            )
        model.requires_grad_(False)
        for block in layers[len(layers) - top_blocks :]:
            block.requires_grad_(True)
        norm = getattr(model.get_decoder(), "norm", None)
        if isinstance(norm, nn.Module):
            norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def compile_blocks(model: PreTrainedModel, dynamic: bool = True) -> PreTrainedModel:
    """``torch.compile`` each decoder block in place (before FSDP wrapping, after activation
    checkpointing is enabled), the per-block recipe of torchtitan: small graphs, one compile
    reused by every block. ``dynamic``: packed rows change length every micro-batch, so compile
    for symbolic lengths instead of recompiling per shape. The chunked log-probs stay eager.
    """
    for block in decoder_blocks(model, "compile"):
        block.compile(dynamic=dynamic)
    return model
