"""Train only the top decoder blocks of a causal LM (``trainer.train_top_blocks``).

On a CPU the backward pass dominates a step. Freezing the embeddings and the lower blocks means
no activation is kept and no gradient computed below the first trainable block, so a step costs
about one forward plus the backward of the top blocks. The final norm stays trainable; a tied
output layer shares the (frozen) input embedding. Applied to the Hugging Face model before
sharding: FSDP2 accepts groups that mix frozen and trainable parameters.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def freeze_below_top_blocks(model: PreTrainedModel, top_blocks: int) -> int:
    """Leave only the last ``top_blocks`` decoder blocks (and the final norm) trainable.

    ``top_blocks <= 0`` leaves the model untouched. Returns the number of trainable parameters.
    """
    if top_blocks > 0:
        layers = getattr(model.get_decoder(), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ValueError(
                f"trainer.train_top_blocks: {type(model).__name__} has no decoder.layers to freeze"
            )
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
