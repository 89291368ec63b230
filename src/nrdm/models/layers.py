"""Residual-branch bodies and embeddings shared by every backbone.

Nothing here knows about residual variants: these are the `f` of `z + alpha(c) f(z) + beta(c)`
(see `gated_unit.py`) and the embedders that build the conditioning vector `c`.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

_explicit_attention_depth = 0


@contextmanager
def explicit_attention():
    """Compute attention as softmax(q k^T / sqrt(d)) v with plain matmuls.

    The fused CPU/GPU kernel behind `F.scaled_dot_product_attention` has no forward-mode AD
    (needed by the Jacobian-vector products of the sensitivity penalty) and is invisible to
    `torch.utils.flop_counter`. Inside this context every `Attention` takes the explicit path,
    which is mathematically identical.
    """
    global _explicit_attention_depth
    _explicit_attention_depth += 1
    try:
        yield
    finally:
        _explicit_attention_depth -= 1


def check_heads(width: int, heads: int) -> None:
    if heads < 1 or width % heads != 0:
        allowed = [h for h in range(1, width + 1) if width % h == 0]
        raise ValueError(f"heads={heads} does not divide width={width}; allowed heads: {allowed}")


class Attention(nn.Module):
    """Multi-head self-attention over the token axis of a (B, N, C) tensor."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        check_heads(width, heads)
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                              # 3 x (B, H, N, d)
        if _explicit_attention_depth:
            weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
            out = weights @ v                                             # (B, H, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v)                 # (B, H, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))            # (B, N, C)


# The MLPs' activation. DiT (and timm's ViT it builds on) uses GELU's tanh approximation; the exact
# (erf) GELU differs from it by < 5e-4 and is the cheaper kernel on CPUs: ATen's tanh form ran 6.6x
# slower forward and 2.1x slower forward+backward on an AVX2 host, which made a digits-flow
# training step 1.10x slower (docs/performance.md).
ACTIVATIONS = {"gelu-tanh": functools.partial(F.gelu, approximate="tanh"), "gelu": F.gelu}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Mlp(nn.Module):
    """Two-layer GELU MLP, as in ViT/DiT."""

    def __init__(self, width: int, ratio: float = 4.0, activation: str = "gelu-tanh"):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Module):
    """GEGLU MLP (Shazeer 2020), as DiMR's blocks use: fc2(gelu(a) * b) with [a, b] = fc1(x),
    fc1 one fused map to 2 * hidden. Same parameters and FLOPs as a GELU MLP of 1.5x the hidden size."""

    def __init__(self, width: int, ratio: float = 2.0, activation: str = "gelu-tanh"):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, 2 * hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(a) * b)


class DepthwiseConv(nn.Module):
    """k x k depthwise conv on a channels-last map (B, H, W, C): ConvNeXt's spatial mixer."""

    def __init__(self, channels: int, kernel_size: int = 7):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)      # (B, H, W, C)


class SpatialAttention(nn.Module):
    """Self-attention over the pixels of a (B, C, H, W) feature map (U-Net low resolutions)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.attn = Attention(channels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)                     # (B, HW, C)
        return self.attn(tokens).transpose(1, 2).reshape(B, C, H, W)


class TemporalAttention(nn.Module):
    """Self-attention across frames, separately at each pixel, of a (B*F, C, H, W) feature map
    that holds the F frames of each clip in a row (space-time U-Net, as in Video Diffusion Models)."""

    def __init__(self, channels: int, heads: int, num_frames: int):
        super().__init__()
        self.attn = Attention(channels, heads)
        self.num_frames = num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        BF, C, H, W = x.shape
        F_ = self.num_frames
        seq = x.view(BF // F_, F_, C, H * W).permute(0, 3, 1, 2).reshape(-1, F_, C)   # (B*HW, F, C)
        out = self.attn(seq).view(BF // F_, H * W, F_, C)                             # (B, HW, F, C)
        return out.permute(0, 2, 3, 1).reshape(BF, C, H, W)                           # (B*F, C, H, W)


class ConvBranch(nn.Module):
    """Residual conv branch of a U-Net block (the norm in front of it belongs to the unit):
    SiLU -> conv3x3 -> GroupNorm -> SiLU -> dropout -> conv3x3."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = group_norm(channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(x))
        return self.conv2(self.dropout(F.silu(self.norm(h))))


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide the channel count."""
    return nn.GroupNorm(math.gcd(32, channels), channels, affine=affine)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------

EMBEDDINGS = ("nrdm", "dit", "diffusers")


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """(B,) float timesteps -> (B, dim) [cos | sin] features with frequencies
    exp(-ln(max_period) k / (half - freq_shift)), k < half = dim // 2 (freq_shift 1: diffusers' DiT)."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]                      # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Diffusion step n -> sinusoidal features -> 2-layer MLP (as in DiT). freq_shift 1 reproduces
    diffusers' DiT, whose frequencies divide by half - 1 where the official DiT's divide by half."""

    def __init__(self, width: int, frequency_dim: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_dim, self.freq_shift = frequency_dim, freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.frequency_dim, freq_shift=self.freq_shift))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Index `num_classes` is the null class used for classifier-free
    guidance (labels are dropped to it by the training loss, not here).

    The table starts at N(0, 1), as ADM's (PyTorch's default), not DiT's N(0, 0.02): the
    conditioning c = t_emb + y_emb feeds zero-initialised gate heads, and next to our time
    embedding (rms 0.14 at init) a class embedding of rms 0.02 is nearly invisible to them. With
    0.02 the digits flow transformer drew the asked class for 16% of samples after 500 steps,
    with N(0, 1) for 99% (U-shaped: 94% -> 99.8%; docs/design.md)."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)
        nn.init.normal_(self.table.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():      # a compiled graph keeps the embedding's own index check
            self.check(labels)
        return self.table(labels)

    def check(self, labels: torch.Tensor) -> None:
        """A clear error for labels outside [0, num_classes], without a host sync on an accelerator
        (there the check runs asynchronously with the queued work)."""
        valid = ((labels >= 0) & (labels <= self.num_classes)).all()
        message = f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class)"
        if labels.device.type != "cpu":
            torch._assert_async(valid, message)
        elif not bool(valid):
            raise ValueError(f"{message}; got range [{int(labels.min())}, {int(labels.max())}]")


def sincos_pos_embed_2d(width: int, grid: int, layout: str = "nrdm") -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, width), rows of the table in row-major
    patch order. layout "nrdm": the first half encodes the row, the second the column, each
    [cos | sin]; "dit" (DiT/MAE, also diffusers' DiT): the first half the column, the second the
    row, each [sin | cos]. Same frequencies; the tables differ by a permutation of the channels."""
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for 2-D sin-cos position embeddings, got {width}")
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb_rows = sinusoidal_embedding(rows.flatten(), width // 2, max_period=10000.0)
    emb_cols = sinusoidal_embedding(cols.flatten(), width // 2, max_period=10000.0)
    if layout == "nrdm":
        return torch.cat([emb_rows, emb_cols], dim=-1)  # (grid*grid, width)
    sin_first = [e.roll(width // 4, dims=-1) for e in (emb_cols, emb_rows)]   # [cos|sin] -> [sin|cos]
    return torch.cat(sin_first, dim=-1)                 # (grid*grid, width)


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------

def check_patch(image_size: int, patch_size: int) -> None:
    if patch_size < 1 or image_size % patch_size != 0:
        allowed = [p for p in range(1, image_size + 1) if image_size % p == 0]
        raise ValueError(
            f"patch_size={patch_size} does not divide image_size={image_size}; allowed patch sizes: {allowed}")


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) tokens in row-major patch order -> (B, C, H, W) image."""
    B, N, _ = tokens.shape
    grid = int(math.isqrt(N))
    x = tokens.reshape(B, grid, grid, patch_size, patch_size, channels)  # (B, h, w, p, p, C)
    x = torch.einsum("bhwpqc->bchpwq", x)                                 # (B, C, h, p, w, q)
    return x.reshape(B, channels, grid * patch_size, grid * patch_size)
