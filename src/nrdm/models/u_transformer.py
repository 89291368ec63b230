"""U-shaped transformer (U-ViT-like): time/class tokens + patch tokens, in-blocks, a middle,
out-blocks that fuse their long skip by Linear(concat(z, skip)); every residual update is a
gated unit. Optional ScaleLong skip scaling."""
from __future__ import annotations

import torch
from torch import nn

from nrdm.models.blocks import (Backbone, ConditionEmbedder, LongSkipScaler, TransformerBlock,
                                wants_input_conditioning)
from nrdm.models.gated_unit import UnitConfig, count_units
from nrdm.models.layers import check_heads, check_patch, sincos_pos_embed_2d, unpatchify


class UShapedTransformer(Backbone):
    """depth = total number of transformer blocks: (depth-1)//2 in-blocks, the same number of
    out-blocks (each with one long skip), and the rest (1 or 2 blocks) in the middle.

    The conditioning reaches every variant as extra tokens (time token, class token), as in
    U-ViT, and additionally through the gates of the variants that have conditioned gates.
    skip_scaling: "none" | "constant" (kappa^(i-1), i = 1 outermost) | "learned" (shared SE gate).
    input_conditioning "on" additionally adds Linear(c) to the patch tokens ("auto" = off here,
    because the condition tokens already reach every variant). activation as in FlowTransformer.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 4, patch_size: int = 2, width: int = 512,
                 depth: int = 13, heads: int = 8, mlp_ratio: float = 4.0, num_classes: int = 0,
                 unit: UnitConfig | str = "nrdm", skip_scaling: str = "none", skip_kappa: float = 0.5,
                 input_conditioning: str = "auto", num_timesteps: int = 1000, text_dim: int = 0,
                 text_tokens: int = 0, activation: str = "gelu-tanh"):
        super().__init__()
        check_patch(image_size, patch_size)
        check_heads(width, heads)
        if depth < 3:
            raise ValueError(f"a U-shaped transformer needs depth >= 3 (in-block, middle, out-block), got {depth}")
        self._set_io(image_size, in_channels, patch_size, num_classes, num_timesteps, unit, text_dim)
        n_side = (depth - 1) // 2
        n_tokens = (image_size // patch_size) ** 2
        # time token (+ class or pooled-text token) (+ text tokens)
        self.n_extra = 1 + (num_classes > 0 or text_dim > 0) + (text_tokens if text_dim else 0)

        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        # Learned position embedding as in U-ViT, but started from the 2-D sin-cos table (extra
        # tokens at 0) instead of N(0, 0.02): at 0.02 the positions are drowned by the patch
        # features after each unit's LayerNorm, and attention must first learn where tokens are
        # (docs/design.md: the loss after 300 steps halves).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_extra + n_tokens, width))
        with torch.no_grad():
            self.pos_embed[0, self.n_extra:] = sincos_pos_embed_2d(width, image_size // patch_size)
        self.embed = ConditionEmbedder(width, num_classes, num_timesteps, text_dim, text_tokens)
        wants = input_conditioning != "auto" and wants_input_conditioning(input_conditioning, self.unit)
        self.cond_in = nn.Linear(width, width) if wants else None

        def block():
            return TransformerBlock(width, heads, mlp_ratio, width, self.unit, activation=activation)

        self.in_blocks = nn.ModuleList(block() for _ in range(n_side))
        self.mid_blocks = nn.ModuleList(block() for _ in range(depth - 2 * n_side))
        self.out_blocks = nn.ModuleList(block() for _ in range(n_side))
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(n_side))
        self.skip_scale = LongSkipScaler(skip_scaling, width, skip_kappa, channel_axis=-1)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_size * patch_size * in_channels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # U-ViT's final 3x3 conv, started as the identity: a randomly initialised conv after the
        # zero-initialised head is a random blur whose frequency response the head must learn to
        # invert (near-zero frequencies are unlearnable until the conv moves), which made this
        # backbone ~5x slower to leave the noise regime (docs/design.md).
        self.out_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        nn.init.dirac_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        count_units(self)                            # depth-mup's L

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        cond, t_emb, y_emb, context = self.embed(t, condition)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)            # (B, N, D)
        if self.cond_in is not None:
            patches = patches + self.cond_in(cond.vec)[:, None]
        extra = [t_emb[:, None]] + ([y_emb[:, None]] if y_emb is not None else []) + (
            [context] if context is not None else [])
        z = torch.cat(extra + [patches], dim=1) + self.pos_embed            # (B, E+N, D)

        z = self._span(z, cond, 0)                                           # (B, E+N, D)
        out = self.head(self.norm(z[:, self.n_extra:]))                     # (B, N, p*p*C)
        return self.out_conv(unpatchify(out, self.patch_size, self.in_channels))  # (B, C, H, W)

    def _span(self, z: torch.Tensor, cond, i: int) -> torch.Tensor:
        """In-block i, everything inside it, out-block i with the long skip from in-block i (i = 0
        the outermost pair); all of it below the outermost pair is the feature cache's section."""
        if i == len(self.in_blocks):
            for block in self.mid_blocks:
                z = self.run_block(block, z, cond)                                 # (B, E+N, D)
            return z
        z = self.run_block(self.in_blocks[i], z, cond)                             # (B, E+N, D)
        skip = self.skip_scale(z, i + 1)                                     # long skip i+1 (1 = outermost)
        inner = lambda z: self._span(z, cond, i + 1)
        z = self.cached("deep", z, inner) if i == 0 else inner(z)
        k = len(self.in_blocks) - 1 - i                                      # out-blocks run innermost first
        return self.run_block(self.out_blocks[k], self.skip_fuse[k](torch.cat([z, skip], dim=-1)), cond)
