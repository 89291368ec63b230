"""Building blocks shared by the backbones: the conditioning embedder, the transformer block (two
gated units), input conditioning, and ScaleLong's long-skip scaling for U-shaped nets."""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from nrdm.models.gated_unit import Conditioning, GatedResidual, UnitConfig
from nrdm.models.layers import Attention, GatedMlp, LabelEmbedder, Mlp, TimestepEmbedder
from nrdm.models.text_encoders import TextEmbeddings

INPUT_CONDITIONING = ("auto", "on", "off")
SKIP_SCALINGS = ("none", "constant", "learned")
MLPS = {"gelu": Mlp, "geglu": GatedMlp}


class ConditionEmbedder(nn.Module):
    """(t, condition) -> Conditioning(c, tau), t_emb, y_emb, context.

    condition: class labels (B,) for num_classes > 0 (index num_classes = the null class), or a
    TextEmbeddings for text_dim > 0: its pooled vector joins c through a linear map and, with
    text_tokens > 0, its first text_tokens token features become context tokens (B, L, D) that
    token backbones put in front of their patch tokens (in-context conditioning, as U-ViT does).
    c = t_emb + y_emb, tau = 2t/T - 1. num_classes = text_dim = 0: unconditional.
    """

    def __init__(self, width: int, num_classes: int, num_timesteps: int, text_dim: int = 0, text_tokens: int = 0,
                 time_freq_shift: int = 0):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.time = TimestepEmbedder(width, freq_shift=time_freq_shift)
        self.label = LabelEmbedder(num_classes, width) if num_classes > 0 and not text_dim else None
        self.text = TextEmbedder(text_dim, width, text_tokens) if text_dim else None
        self.shared_gates = None        # SharedGateHeads, set by count_units for gate_source "shared"
        self.fused_gates = None         # FusedGateHeads, set by count_units for fused_gates

    def forward(self, t: torch.Tensor, condition):
        t_emb = self.time(t)                                                     # (B, D)
        y_emb, context = None, None
        if self.label is not None:
            if not isinstance(condition, torch.Tensor):
                raise ValueError("this model is class-conditional: pass class labels (B,) "
                                 f"(use {self.label.num_classes} for the null class)")
            y_emb = self.label(condition)                                        # (B, D)
        elif self.text is not None:
            if not isinstance(condition, TextEmbeddings):
                raise ValueError("this model is text-conditional: pass TextEmbeddings (model.null_condition(n) "
                                 "for the empty caption)")
            y_emb, context = self.text(condition)                                # (B, D), (B, L, D) or None
        vec = t_emb if y_emb is None else t_emb + y_emb
        tau = 2.0 * t.float() / self.num_timesteps - 1.0                         # (B,)
        shared = self.shared_gates(vec) if self.shared_gates is not None else None
        fused = self.fused_gates(vec) if self.fused_gates is not None else None
        return Conditioning(vec, tau, shared, fused), t_emb, y_emb, context


class TextEmbedder(nn.Module):
    """TextEmbeddings -> (pooled vector (B, D), context tokens (B, L, D) or None). Holds the
    embedding of the empty caption (`null_*` buffers, saved with the weights) for guidance and
    caption dropout; padded token slots enter as zeros (they project to one constant token)."""

    def __init__(self, text_dim: int, width: int, tokens: int):
        super().__init__()
        self.text_dim, self.tokens = text_dim, tokens
        self.pooled = nn.Linear(text_dim, width)
        self.token_proj = nn.Linear(text_dim, width) if tokens else None
        self.register_buffer("null_pooled", torch.zeros(1, text_dim))
        self.register_buffer("null_tokens", torch.zeros(1, max(tokens, 1), text_dim))
        self.register_buffer("null_mask", torch.zeros(1, max(tokens, 1), dtype=torch.bool))

    def set_null(self, empty: TextEmbeddings) -> None:
        """Store the encoder's embedding of the empty caption "" (shape (1, ...))."""
        empty = empty.fit(max(self.tokens, 1))
        self.null_pooled.copy_(empty.pooled[:1])
        self.null_tokens.copy_(empty.tokens[:1])
        self.null_mask.copy_(empty.mask[:1])

    def null(self, batch: int) -> TextEmbeddings:
        return TextEmbeddings(self.null_pooled.expand(batch, -1), self.null_tokens.expand(batch, -1, -1),
                              self.null_mask.expand(batch, -1))

    def forward(self, text: TextEmbeddings):
        if text.pooled.shape[-1] != self.text_dim:
            raise ValueError(f"text embeddings have {text.pooled.shape[-1]} features, the model expects "
                             f"{self.text_dim} (model.text_dim must match the text encoder)")
        vec = self.pooled(text.pooled.to(self.pooled.weight.dtype))                      # (B, D)
        if self.token_proj is None:
            return vec, None
        _, tokens, mask = text.fit(self.tokens)
        tokens = tokens.to(self.token_proj.weight.dtype) * mask[..., None]               # padding -> zeros
        return vec, self.token_proj(tokens)                                              # (B, L, D)


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone inside DDP / FSDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def split_output(model: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance values) of a network output: for learned-sigma models (2C channels)
    the first C channels (eps or v) and the rest (improved DDPM's variance interpolation v in
    about [-1, 1]); otherwise (out, None)."""
    model = unwrap(model)
    if not getattr(model, "learn_sigma", False):
        return out, None
    return out[:, :model.in_channels], out[:, model.in_channels:]


def prediction_part(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The prediction (eps, v) of a network output (see split_output)."""
    return split_output(model, out)[0]


def wants_input_conditioning(setting: str, unit: UnitConfig) -> bool:
    """Whether a backbone adds c to its input features: "auto" does so exactly when the gates
    do not carry the conditioning (resnet, rezero, time-only gates)."""
    if setting not in INPUT_CONDITIONING:
        raise ValueError(f"unknown input_conditioning {setting!r}; allowed: {', '.join(INPUT_CONDITIONING)}")
    return setting == "on" or (setting == "auto" and not unit.gates_see_condition)


def layer_norm(width: int):
    """Norm factory for token units: LayerNorm, affine unless the unit modulates it."""
    return lambda affine: nn.LayerNorm(width, elementwise_affine=affine, eps=1e-6)


class TransformerBlock(nn.Module):
    """Two gated residual units: z -> unit(mixer) -> unit(MLP). The mixer is self-attention over the
    token axis (default) or any module on (..., C) features; mlp = "gelu" (ViT/DiT) or "geglu";
    activation: the MLP's GELU, "gelu-tanh" (DiT's) or "gelu" (exact; faster on CPUs)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cond_dim: int, unit: UnitConfig,
                 mixer: nn.Module | None = None, mlp: str = "gelu", activation: str = "gelu-tanh"):
        super().__init__()
        mixer = Attention(width, heads) if mixer is None else mixer
        if mlp not in MLPS:
            raise ValueError(f"unknown mlp {mlp!r}; allowed: {', '.join(MLPS)}")
        body = MLPS[mlp](width, mlp_ratio, activation)
        self.attn = GatedResidual(mixer, width, cond_dim, unit, layer_norm(width))
        self.mlp = GatedResidual(body, width, cond_dim, unit, layer_norm(width))

    def forward(self, z: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.mlp(self.attn(z, cond), cond)                                # (B, N, C)


class LongSkipScaler(nn.Module):
    """ScaleLong: scale the long skips of a U-shaped net.

    constant: skip i (i = 1 outermost ... N innermost) is multiplied by kappa^(i-1).
    learned:  one squeeze-excitation gate shared by all skips, s = sigmoid(W2 relu(W1 mean(skip)))
              per channel (mean over tokens / pixels), skip * s.
    """

    def __init__(self, mode: str, channels: int, kappa: float = 0.5, channel_axis: int = -1):
        super().__init__()
        if mode not in SKIP_SCALINGS:
            raise ValueError(f"unknown skip_scaling {mode!r}; allowed: {', '.join(SKIP_SCALINGS)}")
        if mode == "constant" and not 0.0 < kappa <= 1.0:
            raise ValueError(f"skip_kappa must lie in (0, 1] (ScaleLong suggests 0.5-0.95), got {kappa}")
        self.mode, self.kappa, self.channel_axis = mode, kappa, channel_axis
        if mode == "learned":
            hidden = max(channels // 4, 4)
            self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, skip: torch.Tensor, index: int) -> torch.Tensor:
        """index: 1 for the outermost skip, N for the innermost."""
        if self.mode == "constant":
            return skip * self.kappa ** (index - 1)
        if self.mode == "learned":
            if self.channel_axis == -1:
                pooled = skip.mean(dim=1)                                        # (B, C) from (B, N, C)
                return skip * torch.sigmoid(self.squeeze(pooled))[:, None, :]
            pooled = skip.mean(dim=(2, 3))                                       # (B, C) from (B, C, H, W)
            return skip * torch.sigmoid(self.squeeze(pooled))[:, :, None, None]
        return skip


class Backbone(nn.Module):
    """What every backbone shares: `forward(x, t, condition=None) -> prediction with x's shape`.

    x: (B, *sample_shape) noisy input, t: (B,) diffusion steps in [0, num_timesteps), condition: the
    condition: (B,) class indices with `null_class` (= num_classes) meaning "no class", or
    TextEmbeddings for text models (text_dim > 0); `null_condition(B)` gives the "no condition"
    input of either kind.
    """

    image_size: int
    in_channels: int
    num_classes: int
    num_timesteps: int
    unit: UnitConfig
    grad_checkpointing: bool = False   # recompute each block in the backward pass to save memory
    partial_forward: bool = False      # True when forward(x, t, condition) leaves some parameters unused
    learn_sigma: bool = False          # outputs 2C channels: the prediction, then a variance interpolation

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    feature_cache: "FeatureCache | None" = None     # set by nrdm.models.caching.feature_cache while sampling

    def cached(self, name: str, z: torch.Tensor, section) -> torch.Tensor:
        """section(z): the backbone's deep part. With a feature cache on a step that reuses, z plus
        the change the section made at the last full step (or, when its output has another shape,
        that output); otherwise the section itself, its change stored. See nrdm.models.caching."""
        cache = self.feature_cache
        if cache is None:
            return section(z)
        key = (name, tuple(z.shape))
        if not cache.full and key in cache.store:
            stored = cache.store[key]
            return z + stored if stored.shape == z.shape else stored
        out = section(z)
        cache.store[key] = out - z if out.shape == z.shape else out
        return out

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (each gathered for its own forward and backward): the
        transformer blocks; backbones with other repeated modules override this."""
        return [m for m in self.modules() if isinstance(m, TransformerBlock)]

    def run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """Call a block, through activation checkpointing when enabled (training only)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _set_io(self, image_size: int, in_channels: int, patch_size: int, num_classes: int, num_timesteps: int,
                unit: UnitConfig | str, text_dim: int = 0) -> None:
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.text_dim = text_dim
        self.num_classes, self.num_timesteps = (0 if text_dim else num_classes), num_timesteps
        self.unit = UnitConfig.parse(unit)

    text_dim: int = 0

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0 or self.text_dim > 0

    def null_condition(self, batch: int, device=None):
        """The "no condition" input for guidance and condition dropout: the null class, or the
        empty caption's embedding for text models; None for unconditional models."""
        if self.text_dim:
            return self.embed.text.null(batch)
        if self.num_classes:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample without the batch axis: (C, H, W); video backbones (C, F, H, W)."""
        return (self.in_channels, self.image_size, self.image_size)

    def example_inputs(self, batch: int = 1, device="cpu"):
        x = torch.zeros(batch, *self.sample_shape, device=device)
        t = torch.full((batch,), self.num_timesteps // 2, device=device, dtype=torch.long)
        condition = self.null_condition(batch, device) if self.text_dim else (
            torch.zeros(batch, dtype=torch.long, device=device) if self.num_classes else None)
        return x, t, condition

    def check_input(self, x: torch.Tensor) -> None:
        expected = self.sample_shape
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects input of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
