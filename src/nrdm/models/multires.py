"""Multi-resolution backbone (DiMR, Liu et al. 2024): R branches from coarse to fine, each refining
the upsampled features of the one before, every residual update a gated unit.

    branch 1      transformer blocks on patch tokens at 1/2^(R-1) of the input resolution
    branch 2..R   ConvNeXt blocks (a 7x7 depthwise conv unit, then a GEGLU MLP unit) on maps at
                  twice the previous branch's resolution; branch R at the input's

Inside a branch the blocks are arranged as in U-ViT: in-blocks, a middle, out-blocks that fuse a
long skip by Linear(concat(z, skip)). Between branches (DiMR's feature cascade) the input features
and every block output of branch r-1 are concatenated channel-wise, then LayerNorm -> Linear to
4 C_r -> pixel shuffle x2 -> LayerNorm, and the result is added to branch r's input features
(feed "add"), or concatenated with them and fused by Linear(2 C_r, C_r) (feed "concat").
cross_skips: block j of branch r also gets the upsampled output of the block at the same relative
depth of branch r-1, each through its own LayerNorm -> Linear -> pixel shuffle.

Every branch embeds the noisy input itself (a patchify conv to its own resolution) and has its own
head (LayerNorm, 3x3 conv, zero-initialised) predicting the target at its resolution. forward
returns the last branch's prediction; forward(..., all_branches=True) returns all of them, for the
multi-resolution loss (`diffusion.branch_weights`, nrdm.diffusion.loss).

    x (B, C, H, W) -> [(B, C, H/2^(R-1), W/2^(R-1)), ..., (B, C, H/2, W/2), (B, C, H, W)]

The paper's time-dependent layer norm (TD-LN) is `variant: adaln` with `gate_source: tdp`: the
unit's LayerNorm scale and shift become time-dependent parameters (the DiMR sizes default to it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nrdm.models.blocks import Backbone, ConditionEmbedder, TransformerBlock, wants_input_conditioning
from nrdm.models.gated_unit import Conditioning, UnitConfig, count_units
from nrdm.models.layers import DepthwiseConv, check_heads, sincos_pos_embed_2d

BRANCH_FEEDS = ("add", "concat")
FIRST_BRANCHES = ("transformer", "convnext")


class CascadeUpsample(nn.Module):
    """(B, h, w, C_in) -> (B, 2h, 2w, C_out): LayerNorm, Linear to 4 C_out, pixel shuffle, LayerNorm."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(c_in)
        self.proj = nn.Linear(c_in, 4 * c_out)
        self.norm_out = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm_in(x)).permute(0, 3, 1, 2)                  # (B, 4 C_out, h, w)
        return self.norm_out(F.pixel_shuffle(x, 2).permute(0, 2, 3, 1))     # (B, 2h, 2w, C_out)


class Branch(nn.Module):
    """One resolution of the cascade. tokens=True: transformer blocks on the flattened map with the
    condition tokens in front; otherwise ConvNeXt blocks on the channels-last map.

    below: width of the previous branch's maps and their number (0, 0 for the first branch)."""

    def __init__(self, in_channels: int, stride: int, grid: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, kernel_size: int, cond_dim: int, unit: UnitConfig, tokens: bool,
                 input_conditioning: bool, below: tuple[int, int], feed: str, cross_skips: bool,
                 activation: str = "gelu-tanh"):
        super().__init__()
        self.tokens, self.depth = tokens, depth
        self.n_side = (depth - 1) // 2
        self.embed = nn.Conv2d(in_channels, width, kernel_size=stride, stride=stride)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(width, grid).view(1, grid, grid, width))
        self.cond_in = nn.Linear(cond_dim, width) if input_conditioning else None
        below_width, below_maps = below
        self.below_maps = below_maps
        self.upsample = CascadeUpsample(below_width * below_maps, width) if below_maps else None
        self.fuse = nn.Linear(2 * width, width) if below_maps and feed == "concat" else None
        self.cross = (nn.ModuleList(CascadeUpsample(below_width, width) for _ in range(depth))
                      if below_maps and cross_skips else None)
        # block j of this branch takes map round((j + 1) * (n - 1) / depth) of the n below
        self.cross_source = [round((j + 1) * (below_maps - 1) / depth) for j in range(depth)]

        def block():
            mixer = None if tokens else DepthwiseConv(width, kernel_size)
            return TransformerBlock(width, heads, mlp_ratio, cond_dim, unit, mixer=mixer, mlp="geglu",
                                    activation=activation)

        self.blocks = nn.ModuleList(block() for _ in range(depth))
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(self.n_side))
        self.head_norm = nn.LayerNorm(width)
        self.head = nn.Conv2d(width, in_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def n_maps(self) -> int:
        """Maps this branch hands to the next: its input features and every block's output."""
        return self.depth + 1

    def forward(self, x: torch.Tensor, cond: Conditioning, extra: torch.Tensor | None,
                below: torch.Tensor | None, run_block, predict: bool = True):
        """x: noisy input (B, C, H, W); extra: condition tokens (B, E, D) for a token branch; below:
        the previous branch's maps concatenated (B, h/2, w/2, n * C_below) or None.
        Returns (prediction (B, C, h, w) or None, this branch's maps (B, h, w, n_maps * C))."""
        h = self.embed(x).permute(0, 2, 3, 1) + self.pos_embed               # (B, h, w, C)
        if self.cond_in is not None:
            h = h + self.cond_in(cond.vec)[:, None, None]                    # (B, h, w, C)
        crossed = None
        if below is not None:
            up = self.upsample(below)                                        # (B, h, w, C)
            h = h + up if self.fuse is None else self.fuse(torch.cat([h, up], dim=-1))
            if self.cross is not None:
                crossed = below.chunk(self.below_maps, dim=-1)                # below_maps x (B, h/2, w/2, C_below)
        B, H, W, C = h.shape
        n_extra = 0 if extra is None else extra.shape[1]
        z = torch.cat([extra, h.flatten(1, 2)], dim=1) if self.tokens else h  # (B, E+hw, C) or (B, h, w, C)

        maps, skips = [z], []
        for j, block in enumerate(self.blocks):
            if j >= self.depth - self.n_side:                                # out-blocks: fuse the long skip
                k = self.depth - 1 - j
                z = self.skip_fuse[k](torch.cat([z, skips.pop()], dim=-1))
            if crossed is not None:                                          # (only ConvNeXt branches have a branch below)
                z = z + self.cross[j](crossed[self.cross_source[j]])         # (B, h, w, C)
            z = run_block(block, z, cond)
            if j < self.n_side:
                skips.append(z)
            maps.append(z)
        maps = [self._as_map(m, n_extra, H, W) for m in maps]                # each (B, h, w, C)
        prediction = None
        if predict:
            prediction = self.head(self.head_norm(maps[-1]).permute(0, 3, 1, 2))   # (B, C_in, h, w)
        return prediction, torch.cat(maps, dim=-1)

    def _as_map(self, z: torch.Tensor, n_extra: int, H: int, W: int) -> torch.Tensor:
        return z[:, n_extra:].unflatten(1, (H, W)) if self.tokens else z


class MultiResolution(Backbone):
    """R = 1 + len(branch_widths) branches. width, depth, heads, mlp_ratio: the transformer branch
    (depth blocks, (depth-1)//2 of them in-blocks); branch_widths / branch_depths: the ConvNeXt
    branches from coarse to fine; patch_size must be 2^(R-1) (the transformer branch's patch).

    The conditioning reaches the transformer branch as tokens (time, class or pooled text, text
    tokens; as U-ViT) and, for variants with conditioned gates, every unit through its gates; the
    ConvNeXt branches of variants whose gates do not see c get Linear(c) added to their input
    features (input_conditioning "auto"; "on" adds it to every branch, "off" to none).
    activation: the GEGLU MLPs' GELU, as in FlowTransformer.
    """

    partial_forward = True          # the coarse branches' heads act only with all_branches=True

    def __init__(self, image_size: int = 32, in_channels: int = 4, patch_size: int = 2, width: int = 960,
                 depth: int = 39, heads: int = 16, mlp_ratio: float = 2.0, branch_widths=(480,),
                 branch_depths=(21,), kernel_size: int = 7, branch_feed: str = "add", cross_skips: bool = False,
                 first_branch: str = "transformer", num_classes: int = 0, unit: UnitConfig | str = "adaln", input_conditioning: str = "auto",
                 num_timesteps: int = 1000, text_dim: int = 0, text_tokens: int = 0, activation: str = "gelu-tanh"):
        super().__init__()
        branch_widths, branch_depths = tuple(branch_widths), tuple(branch_depths)
        n_branches = 1 + len(branch_widths)
        if len(branch_depths) != len(branch_widths):
            raise ValueError(f"branch_widths {list(branch_widths)} and branch_depths {list(branch_depths)} "
                             "need one entry per ConvNeXt branch")
        if patch_size != 2 ** (n_branches - 1):
            raise ValueError(f"with {n_branches} branches the transformer branch works at 1/{2 ** (n_branches - 1)} "
                             f"of the input resolution: patch_size must be {2 ** (n_branches - 1)}, got {patch_size}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by 2^(R-1) = {patch_size} for R = {n_branches}")
        if first_branch not in FIRST_BRANCHES:
            raise ValueError(f"unknown first_branch {first_branch!r}; allowed: {', '.join(FIRST_BRANCHES)}")
        if branch_feed not in BRANCH_FEEDS:
            raise ValueError(f"unknown branch_feed {branch_feed!r}; allowed: {', '.join(BRANCH_FEEDS)}")
        if min((depth,) + branch_depths) < 1:
            raise ValueError(f"every branch needs at least one block, got depths {[depth, *branch_depths]}")
        check_heads(width, heads)
        self._set_io(image_size, in_channels, patch_size, num_classes, num_timesteps, unit, text_dim)
        self.embed = ConditionEmbedder(width, num_classes, num_timesteps, text_dim, text_tokens)
        conv_conditioning = wants_input_conditioning(input_conditioning, self.unit)

        self.tokens = first_branch == "transformer"
        branches, below = [], (0, 0)
        for r, (w, d) in enumerate(zip((width,) + branch_widths, (depth,) + branch_depths)):
            stride = 2 ** (n_branches - 1 - r)
            tokens = r == 0 and self.tokens
            branch = Branch(in_channels, stride, image_size // stride, w, d, heads if tokens else 1, mlp_ratio,
                            kernel_size, width, self.unit, tokens=tokens,
                            input_conditioning=input_conditioning == "on" if tokens else conv_conditioning,
                            below=below, feed=branch_feed, cross_skips=cross_skips, activation=activation)
            branches.append(branch)
            below = (w, branch.n_maps)
        self.branches = nn.ModuleList(branches)
        count_units(self)                            # depth-mup's L

    @property
    def branch_sizes(self) -> list[int]:
        """Side length of each branch's prediction, coarse to fine."""
        return [self.image_size // 2 ** (len(self.branches) - 1 - r) for r in range(len(self.branches))]

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition=None, all_branches: bool = False):
        self.check_input(x)
        cond, t_emb, y_emb, context = self.embed(t, condition)
        extra = None                                                         # condition tokens (B, E, D)
        if self.tokens:
            extra = torch.cat([t_emb[:, None]] + ([y_emb[:, None]] if y_emb is not None else []) +
                              ([context] if context is not None else []), dim=1)
        if all_branches:
            predictions, below = [], None
            for branch in self.branches:
                prediction, below = branch(x, cond, extra, below, self.run_block)
                predictions.append(prediction)                               # (B, C, h_r, w_r)
            return predictions
        # the coarse branches are the feature cache's section: on a reusing step only the finest runs
        below = self.cached("coarse", x, lambda x: self._coarse(x, cond, extra)) if len(self.branches) > 1 else None
        return self.branches[-1](x, cond, extra, below, self.run_block)[0]        # (B, C, H, W)

    def _coarse(self, x: torch.Tensor, cond: Conditioning, extra: torch.Tensor | None) -> torch.Tensor | None:
        below = None
        for branch in self.branches[:-1]:
            _, below = branch(x, cond, extra, below, self.run_block, predict=False)
        return below
