"""Flow-shaped transformer (DiT-like): patchify -> N transformer blocks of gated units -> un-patchify."""
from __future__ import annotations

import torch
from torch import nn

from nrdm.models.blocks import Backbone, ConditionEmbedder, TransformerBlock, wants_input_conditioning
from nrdm.models.gated_unit import UnitConfig, count_units
from nrdm.models.layers import EMBEDDINGS, check_heads, check_patch, sincos_pos_embed_2d, unpatchify


class FinalLayer(nn.Module):
    """LayerNorm modulated by c (shift, scale from a zero-initialised head, as DiT's final layer),
    then a zero-initialised linear map to patch pixels. The same head serves every variant."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)
        for layer in (self.modulation, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(nn.functional.silu(c)).chunk(2, dim=-1)   # 2 x (B, C)
        x = self.norm(x) * (1 + scale[:, None]) + shift[:, None]               # (B, N, C)
        return self.linear(x)                                                   # (B, N, p*p*C_out)


class FlowTransformer(Backbone):
    """DiT-shaped backbone whose residual updates are all `GatedResidual` units.

    width, depth (number of transformer blocks = 2*depth gated units), heads and patch_size are
    independent knobs. num_classes = 0 -> unconditional.
    input_conditioning: "auto" | "on" | "off"; "on" adds Linear(c) to every patch token, which
    "auto" does for variants whose gates do not see c (resnet, rezero, time-only gates).
    text_dim > 0 makes it text-conditional (pooled text in c); text_tokens > 0 also puts that many
    text tokens in front of the patch tokens.
    learn_sigma: 2C output channels, the prediction and then improved DDPM's variance interpolation
    v (Nichol & Dhariwal 2021), as DiT's. embeddings: the position and timestep tables, "nrdm" (ours),
    "dit" (the official DiT's) or "diffusers" (diffusers' DiT's); imported DiT weights need theirs.
    activation: the MLPs' GELU, "gelu-tanh" (DiT's) or "gelu" (exact; the faster kernel on CPUs).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 4, patch_size: int = 2, width: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 0,
                 unit: UnitConfig | str = "nrdm", input_conditioning: str = "auto", num_timesteps: int = 1000,
                 text_dim: int = 0, text_tokens: int = 0, learn_sigma: bool = False, embeddings: str = "nrdm",
                 activation: str = "gelu-tanh"):
        super().__init__()
        check_patch(image_size, patch_size)
        if embeddings not in EMBEDDINGS:
            raise ValueError(f"unknown embeddings {embeddings!r}; allowed: {', '.join(EMBEDDINGS)}")
        check_heads(width, heads)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._set_io(image_size, in_channels, patch_size, num_classes, num_timesteps, unit, text_dim)
        grid = image_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.learn_sigma = learn_sigma
        layout = "nrdm" if embeddings == "nrdm" else "dit"
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, grid, layout)[None], persistent=False)
        self.embed = ConditionEmbedder(width, num_classes, num_timesteps, text_dim, text_tokens,
                                       time_freq_shift=int(embeddings == "diffusers"))
        self.cond_in = nn.Linear(width, width) if wants_input_conditioning(input_conditioning, self.unit) else None
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, width, self.unit, activation=activation)
                                    for _ in range(depth))
        self.final = FinalLayer(width, patch_size * patch_size * self.out_channels)
        count_units(self)                            # depth-mup's L

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        cond, _, _, context = self.embed(t, condition)                          # c: (B, D), context (B, L, D) or None
        z = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), N = (H/p)*(W/p)
        if self.cond_in is not None:
            z = z + self.cond_in(cond.vec)[:, None]                          # (B, N, D)
        n_context = 0 if context is None else context.shape[1]
        if context is not None:
            z = torch.cat([context, z], dim=1)                               # (B, L+N, D) text tokens in context
        z = self.run_block(self.blocks[0], z, cond)                                # (B, L+N, D)
        z = self.cached("middle", z, lambda z: self._blocks(z, cond, 1, len(self.blocks) - 1))
        if len(self.blocks) > 1:
            z = self.run_block(self.blocks[-1], z, cond)                           # (B, L+N, D)
        out = self.final(z[:, n_context:], cond.vec)                                        # (B, N, p*p*C)
        return unpatchify(out, self.patch_size, self.out_channels)          # (B, C or 2C, H, W)

    def _blocks(self, z: torch.Tensor, cond, start: int, stop: int) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            z = self.run_block(block, z, cond)                                     # (B, L+N, D)
        return z
