"""Model-family adapters, looked up by the model's class (any task head or the plain encoder)."""

from __future__ import annotations

from torch import nn

from kcm_cuda.pruning.adapters.base import FFNAdapter
from kcm_cuda.pruning.adapters.bert import BERT
from kcm_cuda.pruning.adapters.distilbert import DISTILBERT
from kcm_cuda.pruning.adapters.llama import LLAMA, MISTRAL, QWEN2
from kcm_cuda.pruning.adapters.roberta import ROBERTA

ADAPTERS: tuple[FFNAdapter, ...] = (BERT, DISTILBERT, ROBERTA, LLAMA, MISTRAL, QWEN2)

__all__ = ["ADAPTERS", "FFNAdapter", "get_adapter", "supported_models"]


def supported_models() -> str:
    return ", ".join(f"{a.name} ({a.base_classes[0]} and its heads)" for a in ADAPTERS)


def get_adapter(model: object) -> FFNAdapter:
    """The adapter for ``model``; TypeError naming the class when it is not supported."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}"
        )
    candidates = [type(model).__name__]
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module):
        candidates.append(type(base).__name__)
    for adapter in ADAPTERS:
        if any(name in adapter.base_classes for name in candidates):
            # Decoders / cross-attention change the block layout: refuse them explicitly.
            config = getattr(model, "config", None)
            if adapter.causal:
                return adapter
            if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", 0):
                raise TypeError(
                    f"unsupported model class {type(model).__name__}: decoder / cross-attention "
                    f"configurations are not supported (encoders only)"
                )
            return adapter
    raise TypeError(
        f"unsupported model class {type(model).__name__}: supported are {supported_models()}"
    )
