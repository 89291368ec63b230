"""Flow-shaped video transformer (Latte-like): frames are patchified separately, then blocks
alternate between spatial attention (tokens of one frame attend to each other) and temporal
attention (the tokens at one spatial position attend across frames). Every residual update,
in both kinds of block, is a `GatedResidual` unit of the chosen variant.

    x (B, C, F, H, W) -> per-frame patches (B, F, N, D) -> [spatial, temporal] x depth/2 -> (B, C, F, H, W)
"""
from __future__ import annotations

import torch
from torch import nn

from nrdm.models.blocks import Backbone, ConditionEmbedder, TransformerBlock, wants_input_conditioning
from nrdm.models.flow_transformer import FinalLayer
from nrdm.models.gated_unit import Conditioning, UnitConfig, count_units
from nrdm.models.layers import check_heads, check_patch, sincos_pos_embed_2d, sinusoidal_embedding, unpatchify


class VideoTransformer(Backbone):
    """Latte-shaped backbone (its "variant 1": interleaved spatial and temporal blocks).

    depth: total number of transformer blocks; block 0, 2, 4, ... are spatial and 1, 3, 5, ...
    temporal (each block = 2 gated units). Fixed sin-cos position embeddings: 2-D over the patch
    grid (shared by all frames) plus 1-D over frames, both added at the input.
    input_conditioning and activation as in FlowTransformer. num_classes = 0 -> unconditional.
    """

    def __init__(self, image_size: int = 32, num_frames: int = 16, in_channels: int = 4, patch_size: int = 2,
                 width: int = 384, depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 0,
                 unit: UnitConfig | str = "nrdm", input_conditioning: str = "auto", num_timesteps: int = 1000,
                 text_dim: int = 0, activation: str = "gelu-tanh"):
        super().__init__()
        check_patch(image_size, patch_size)
        check_heads(width, heads)
        if depth < 2:
            raise ValueError(f"a video transformer needs depth >= 2 (one spatial and one temporal block), got {depth}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self._set_io(image_size, in_channels, patch_size, num_classes, num_timesteps, unit, text_dim)
        self.num_frames = num_frames
        grid = image_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, grid)[None, None], persistent=False)
        frame_index = torch.arange(num_frames, dtype=torch.float32)
        self.register_buffer("time_embed", sinusoidal_embedding(frame_index, width)[None, :, None], persistent=False)
        self.embed = ConditionEmbedder(width, num_classes, num_timesteps, text_dim)
        self.cond_in = nn.Linear(width, width) if wants_input_conditioning(input_conditioning, self.unit) else None
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, width, self.unit, activation=activation)
                                    for _ in range(depth))
        self.final = FinalLayer(width, patch_size * patch_size * in_channels)
        count_units(self)                            # depth-mup's L

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.num_frames, self.image_size, self.image_size)

    @staticmethod
    def is_temporal(index: int) -> bool:
        return index % 2 == 1

    def apply_block(self, index: int, z: torch.Tensor, per_frame: Conditioning, per_position: Conditioning):
        """Block `index` on tokens z (B, F, N, D): spatial blocks see one frame at a time,
        temporal blocks one spatial position at a time. per_frame / per_position: the
        conditioning repeated F / N times (Conditioning.repeat_each)."""
        B, F, N, D = z.shape
        block = self.blocks[index]
        if self.is_temporal(index):
            seq = z.transpose(1, 2).reshape(B * N, F, D)                        # (B*N, F, D): one position, all frames
            return self.run_block(block, seq, per_position).view(B, N, F, D).transpose(1, 2)
        seq = z.reshape(B * F, N, D)                                            # (B*F, N, D): one frame, all positions
        return self.run_block(block, seq, per_frame).view(B, F, N, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        B, C, F, H, W = x.shape
        cond, _, _, _ = self.embed(t, condition)                                   # c: (B, D)
        frames = x.transpose(1, 2).reshape(B * F, C, H, W)                      # (B*F, C, H, W)
        z = self.patch_embed(frames).flatten(2).transpose(1, 2)                 # (B*F, N, D)
        N, D = z.shape[1:]
        z = z.view(B, F, N, D) + self.pos_embed + self.time_embed               # (B, F, N, D)
        if self.cond_in is not None:
            z = z + self.cond_in(cond.vec)[:, None, None]                       # (B, F, N, D)
        per_frame, per_position = cond.repeat_each(F), cond.repeat_each(N)
        def blocks(z, start, stop):
            for i in range(start, stop):
                z = self.apply_block(i, z, per_frame, per_position)             # (B, F, N, D)
            return z

        depth = len(self.blocks)
        z = blocks(z, 0, 1)
        z = self.cached("middle", z, lambda z: blocks(z, 1, depth - 1))       # blocks 2..depth-1
        z = blocks(z, max(depth - 1, 1), depth)
        out = self.final(z.reshape(B, F * N, D), cond.vec)                      # (B, F*N, p*p*C)
        out = unpatchify(out.reshape(B * F, N, -1), self.patch_size, C)        # (B*F, C, H, W)
        return out.view(B, F, C, H, W).transpose(1, 2)                          # (B, C, F, H, W)
