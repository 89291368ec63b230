"""Building blocks shared by the backbones: the conditioning embedder, the transformer block (two
gated units), input conditioning, and ScaleLong's long-skip scaling for U-shaped nets."""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from nrdm.models.gated_unit import Conditioning, GatedResidual, UnitConfig
from nrdm.models.layers import Attention, LabelEmbedder, Mlp, TimestepEmbedder

INPUT_CONDITIONING = ("auto", "on", "off")
SKIP_SCALINGS = ("none", "constant", "learned")


class ConditionEmbedder(nn.Module):
    """(t, labels) -> Conditioning(c = t_emb + y_emb, tau = 2t/T - 1).

    num_classes = 0 makes the model unconditional (labels are ignored).
    """

    def __init__(self, width: int, num_classes: int, num_timesteps: int):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.time = TimestepEmbedder(width)
        self.label = LabelEmbedder(num_classes, width) if num_classes > 0 else None

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None):
        t_emb = self.time(t)                                                     # (B, D)
        y_emb = None
        if self.label is not None:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels "
                                 f"(use {self.label.num_classes} for the null class)")
            y_emb = self.label(labels)                                           # (B, D)
        vec = t_emb if y_emb is None else t_emb + y_emb
        tau = 2.0 * t.float() / self.num_timesteps - 1.0                         # (B,)
        return Conditioning(vec, tau), t_emb, y_emb


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
    """Two gated residual units: z -> unit(attention) -> unit(MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cond_dim: int, unit: UnitConfig):
        super().__init__()
        self.attn = GatedResidual(Attention(width, heads), width, cond_dim, unit, layer_norm(width))
        self.mlp = GatedResidual(Mlp(width, mlp_ratio), width, cond_dim, unit, layer_norm(width))

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
    """What every backbone shares: `forward(x, t, labels=None) -> prediction with x's shape`.

    x: (B, C, H, W) noisy input, t: (B,) diffusion steps in [0, num_timesteps), labels: (B,)
    class indices with `null_class` (= num_classes) meaning "no class" for guidance.
    """

    image_size: int
    in_channels: int
    num_classes: int
    num_timesteps: int
    unit: UnitConfig
    grad_checkpointing: bool = False   # recompute each block in the backward pass to save memory

    def run(self, block: nn.Module, *args) -> torch.Tensor:
        """Call a block, through activation checkpointing when enabled (training only)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _set_io(self, image_size: int, in_channels: int, patch_size: int, num_classes: int, num_timesteps: int,
                unit: UnitConfig | str) -> None:
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.num_classes, self.num_timesteps = num_classes, num_timesteps
        self.unit = UnitConfig.parse(unit)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample without the batch axis: (C, H, W); video backbones (C, F, H, W)."""
        return (self.in_channels, self.image_size, self.image_size)

    def example_inputs(self, batch: int = 1, device="cpu"):
        x = torch.zeros(batch, *self.sample_shape, device=device)
        t = torch.full((batch,), self.num_timesteps // 2, device=device, dtype=torch.long)
        labels = torch.zeros(batch, dtype=torch.long, device=device) if self.num_classes else None
        return x, t, labels

    def check_input(self, x: torch.Tensor) -> None:
        expected = self.sample_shape
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects input of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
