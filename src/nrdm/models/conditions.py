"""Operations on a model's condition input, whatever its kind: class labels (B,) or
TextEmbeddings. Guidance and condition dropout use these, so neither knows which kind it has."""
from __future__ import annotations

import torch

from nrdm.models.text_encoders import TextEmbeddings


def concat(a, b):
    """Two condition batches -> one (first a, then b)."""
    if isinstance(a, TextEmbeddings):
        length = max(a.tokens.shape[1], b.tokens.shape[1])
        return TextEmbeddings(*(torch.cat([x, y.to(x.device)]) for x, y in zip(a.fit(length), b.fit(length))))
    return torch.cat([a, b])


def replace_where(mask: torch.Tensor, null, cond):
    """Per sample: null where mask (B,) is True, else cond."""
    if isinstance(cond, TextEmbeddings):
        null = null.fit(cond.tokens.shape[1])
        return TextEmbeddings(*(torch.where(mask.view(-1, *[1] * (c.ndim - 1)), n.to(c.device), c)
                                for n, c in zip(null, cond)))
    return torch.where(mask, null, cond)


def null_condition(model, batch: int, device=None):
    """The model's "no condition" input (Backbone.null_condition); for plain modules with a
    `num_classes` attribute, the null class num_classes; None for unconditional models."""
    if hasattr(model, "null_condition"):
        return model.null_condition(batch, device)
    num_classes = getattr(model, "num_classes", 0)
    return torch.full((batch,), num_classes, dtype=torch.long, device=device) if num_classes else None


def is_conditional(model) -> bool:
    return bool(getattr(model, "conditional", getattr(model, "num_classes", 0) > 0))


def take(cond, start: int, stop: int):
    """Samples start..stop of a condition batch."""
    return cond.index(slice(start, stop)) if isinstance(cond, TextEmbeddings) else cond[start:stop]
