"""U-shaped conv net (U-Net): residual conv units at several resolutions, attention units at low
resolution, one long skip per down-path unit. Every residual update is a gated unit; channel
changes happen outside the units (strided / upsampling convs and 1x1 skip-fusion convs).

With num_frames > 0 it is a factorised space-time U-Net for video (as in Video Diffusion Models):
the frames of each clip are folded into the batch for the 2-D convs and spatial attention, and
every stage adds a temporal-attention unit that mixes the frames at each pixel.

    x (B, C, H, W)  or  (B, C, F, H, W) -> (B*F, C, H, W) -> U-Net -> same shape as x
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nrdm.models.blocks import Backbone, ConditionEmbedder, LongSkipScaler, wants_input_conditioning
from nrdm.models.gated_unit import Conditioning, GatedResidual, UnitConfig, count_units
from nrdm.models.layers import ConvBranch, SpatialAttention, TemporalAttention, check_heads, group_norm, \
    sinusoidal_embedding


def _norm(channels: int):
    return lambda affine: group_norm(channels, affine)


class Stage(nn.Module):
    """A conv unit, optionally followed by a spatial-attention unit and (video: num_frames > 0) a
    temporal-attention unit, at one resolution."""

    def __init__(self, channels: int, cond_dim: int, unit: UnitConfig, attention: bool, heads: int,
                 dropout: float, num_frames: int = 0):
        super().__init__()

        def gated(branch):
            return GatedResidual(branch, channels, cond_dim, unit, _norm(channels), channel_axis=1)

        self.conv = gated(ConvBranch(channels, dropout))
        self.attn = gated(SpatialAttention(channels, heads)) if attention else None
        self.temporal = gated(TemporalAttention(channels, heads, num_frames)) if num_frames else None

    def forward(self, h: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        h = self.conv(h, cond)                                               # (B[*F], C, H, W)
        if self.attn is not None:
            h = self.attn(h, cond)                                           # within each frame
        return self.temporal(h, cond) if self.temporal is not None else h   # across frames


class UNet(Backbone):
    """width: channels at full resolution; channel_mult: per-level multipliers (one level per
    entry, resolution halves between levels); depth: conv units per level; attention at every
    level whose resolution is <= attention_resolution, and in the middle. num_frames > 0: video
    clips of that many frames (a temporal-attention unit in every stage, a fixed sinusoidal frame
    embedding added to the stem's output), at every level whose resolution is <=
    temporal_resolution (None: every level; at full resolution a pixel of moving content changes
    from frame to frame, and temporal attention there costs about 30% of a training step).

    input_conditioning "auto": for variants whose gates do not see c (resnet, rezero, time-only
    gates), Linear(c) is added per channel to the stem's output, from where the residual stream
    carries it through the net.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, width: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 2), depth: int = 2, heads: int = 4,
                 attention_resolution: int = 16, dropout: float = 0.0, num_classes: int = 0,
                 unit: UnitConfig | str = "nrdm", skip_scaling: str = "none", skip_kappa: float = 0.5,
                 input_conditioning: str = "auto", num_timesteps: int = 1000, patch_size: int = 1,
                 text_dim: int = 0, num_frames: int = 0, temporal_resolution: int | None = None):
        super().__init__()
        if patch_size != 1:
            raise ValueError(f"the conv U-Net works on pixels/latents directly; patch_size must be 1, got {patch_size}")
        levels = len(channel_mult)
        if levels < 1 or depth < 1:
            raise ValueError(f"UNet needs at least one level and depth >= 1, got channel_mult={channel_mult}, depth={depth}")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size={image_size} must be divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                             f"for channel_mult={tuple(channel_mult)}; use fewer levels or another size")
        channels = [width * m for m in channel_mult]
        for ch in channels:
            check_heads(ch, heads)
        if num_frames < 0:
            raise ValueError(f"num_frames must be >= 0 (0: images), got {num_frames}")
        self._set_io(image_size, in_channels, 1, num_classes, num_timesteps, unit, text_dim)
        self.num_frames = num_frames
        cond_dim = 4 * width

        self.embed = ConditionEmbedder(cond_dim, num_classes, num_timesteps, text_dim)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        frame_index = torch.arange(num_frames, dtype=torch.float32)
        self.register_buffer("frame_embed", sinusoidal_embedding(frame_index, channels[0]), persistent=False)
        self.cond_in = (nn.Linear(cond_dim, channels[0])
                        if wants_input_conditioning(input_conditioning, self.unit) else None)

        def stage(ch, level):
            resolution = image_size // 2 ** level
            temporal = temporal_resolution is None or resolution <= temporal_resolution
            return Stage(ch, cond_dim, self.unit, resolution <= attention_resolution, heads, dropout,
                         num_frames if temporal else 0)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, ch in enumerate(channels):
            self.down.append(nn.ModuleList(stage(ch, level) for _ in range(depth)))
            if level < levels - 1:
                self.downsample.append(nn.Conv2d(ch, channels[level + 1], 3, stride=2, padding=1))
        self.middle = Stage(channels[-1], cond_dim, self.unit, True, heads, dropout, num_frames)
        self.middle_conv = GatedResidual(ConvBranch(channels[-1], dropout), channels[-1], cond_dim, self.unit,
                                         _norm(channels[-1]), channel_axis=1)
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(levels)):
            ch = channels[level]
            self.fuse.append(nn.ModuleList(nn.Conv2d(2 * ch, ch, 1) for _ in range(depth)))
            self.up.append(nn.ModuleList(stage(ch, level) for _ in range(depth)))
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, channels[level - 1], 3, padding=1))
        self.skip_scale = LongSkipScaler(skip_scaling, channels[0], skip_kappa, channel_axis=1) \
            if skip_scaling != "learned" else nn.ModuleList(
                LongSkipScaler("learned", ch, channel_axis=1) for ch in channels)
        self.out_norm = group_norm(channels[0])
        self.out_conv = nn.Conv2d(channels[0], in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        count_units(self)                            # depth-mup's L

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = self.image_size
        return (self.in_channels, self.num_frames, size, size) if self.num_frames else (self.in_channels, size, size)

    def fsdp_units(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, Stage)]

    def _scale_skip(self, skip: torch.Tensor, index: int, level: int) -> torch.Tensor:
        if isinstance(self.skip_scale, nn.ModuleList):        # learned: one gate per level, shared by its skips
            return self.skip_scale[level](skip, index)
        return self.skip_scale(skip, index)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        cond, _, _, _ = self.embed(t, condition)                                # c: (B, 4*width)
        video = x.ndim == 5
        if video:
            B, C, F_, H, W = x.shape
            x = x.transpose(1, 2).reshape(B * F_, C, H, W)                   # (B*F, C, H, W)
            cond = cond.repeat_each(F_)                                      # c per frame: (B*F, 4*width)
        h = self.stem(x)                                                     # (B[*F], C0, H, W)
        if video:
            h = h + self.frame_embed.repeat(B, 1)[:, :, None, None]          # frame f of each clip: + e(f)
        if self.cond_in is not None:
            h = h + self.cond_in(cond.vec)[:, :, None, None]
        h = self._level(h, cond, 0)                                          # (B[*F], C0, H, W)
        out = self.out_conv(F.silu(self.out_norm(h)))                        # (B[*F], C, H, W)
        return out.view(B, F_, C, H, W).transpose(1, 2) if video else out   # x's shape

    def _level(self, h: torch.Tensor, cond, level: int) -> torch.Tensor:
        """The down stages of `level`, everything below it (the feature cache's section when level
        is 0: DeepCache), then its up stages with their long skips."""
        skips = []
        for stage in self.down[level]:
            h = self.run_block(stage, h, cond)                                     # (B, C_l, H/2^l, W/2^l)
            skips.append(h)
        if level == len(self.down) - 1:
            h = self.middle_conv(self.middle(h, cond), cond)                 # (B, C_L, ., .)
        else:
            def below(h):
                h = self._level(self.downsample[level](h), cond, level + 1)  # (B, C_l+1, H/2^(l+1), ...)
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                return self.upsample[len(self.down) - 2 - level](h)          # (B, C_l, H/2^l, W/2^l)
            h = self.cached("deep", h, below) if level == 0 else below(h)
        i = len(self.down) - 1 - level                                       # up paths run innermost first
        for fuse, stage in zip(self.fuse[i], self.up[i]):
            index = level * len(self.down[level]) + len(skips)               # innermost first: N, ..., 1
            skip = self._scale_skip(skips.pop(), index, level)
            h = self.run_block(stage, fuse(torch.cat([h, skip], dim=1)), cond)     # (B, C_l, H/2^l, W/2^l)
        return h
