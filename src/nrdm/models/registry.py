"""Named model sizes, one constructor for every backbone, and parameter / FLOP counts.

    build_model("DiT-S/2", image_size=32, in_channels=4, num_classes=1000, variant="nrdm")
    build_model(backbone="unet", width=32, depth=1, variant="resnet")

Sizes give backbone, width, depth, heads (and patch); anything else is a keyword. Depth can be
overridden independently of width for depth-only sweeps.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nrdm.models.flow_transformer import FlowTransformer
from nrdm.models.gated_unit import UnitConfig
from nrdm.models.layers import explicit_attention
from nrdm.models.multires import MultiResolution
from nrdm.models.u_transformer import UShapedTransformer
from nrdm.models.unet import UNet
from nrdm.models.video_transformer import VideoTransformer

BACKBONES: dict[str, type[nn.Module]] = {
    "flow": FlowTransformer,          # DiT-like
    "u-transformer": UShapedTransformer,  # U-ViT-like
    "unet": UNet,                     # conv U-Net
    "video": VideoTransformer,        # Latte-like (spatial and temporal blocks alternate)
    "multires": MultiResolution,      # DiMR-like (a transformer branch, then ConvNeXt branches at 2x resolution each)
}
VIDEO_BACKBONES = ("video", "unet")   # backbones that take clips (B, C, F, H, W): num_frames > 0
UNIT_KEYS = ("variant", "gate_init", "gate_source", "gate_shape", "fused_gates")


# DiMR with 3 resolutions: (transformer depth, width, heads, ConvNeXt widths, ConvNeXt depths). The paper
# publishes counts, not configurations, and its 256 px and 512 px XL/3R counts (502M / 48 GMACs and
# 525M / 206 GMACs) are not one architecture's. XL/3R keeps XL/2R's transformer branch and branch depth
# (21) with ConvNeXt widths 480 and 240, which gives the published 512 px counts; XL/3R-256 and H/3R are
# fitted to the published counts (benchmarks/model_registry.py prints both, docs/dimr.md).
DIMR_3R = {"XL/3R": (39, 960, 16, (480, 240), (21, 21)), "XL/3R-256": (39, 960, 16, (480, 240), (9, 29)),
           "H/3R": (53, 1152, 16, (576, 288), (31, 25))}


def _sizes() -> dict[str, dict]:
    sizes: dict[str, dict] = {}
    # DiT (Peebles & Xie 2023, table 1): depth, width, heads
    for name, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                        "XL": (28, 1152, 16)}.items():
        for patch in (2, 4, 8):
            sizes[f"DiT-{name}/{patch}"] = dict(backbone="flow", depth=depth, width=width, heads=heads,
                                                patch_size=patch)
    # U-ViT (Bao et al. 2023): total depth, width, heads
    for name, (depth, width, heads) in {"S": (13, 512, 8), "M": (17, 768, 12), "L": (21, 1024, 16),
                                        "H": (29, 1152, 16)}.items():
        for patch in (2, 4):
            sizes[f"U-ViT-{name}/{patch}"] = dict(backbone="u-transformer", depth=depth, width=width,
                                                  heads=heads, patch_size=patch)
    # Latte (Ma et al. 2024): total blocks (spatial + temporal), width, heads; as DiT's S/B/L/XL
    for name, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                        "XL": (28, 1152, 16)}.items():
        sizes[f"Latte-{name}/2"] = dict(backbone="video", depth=depth, width=width, heads=heads, patch_size=2)
    # DiMR (Liu et al. 2024): the transformer branch (blocks, width, heads), then the ConvNeXt branches
    # (widths, blocks); /2R and /3R = 2 and 3 resolutions (transformer patch 2 and 4). Units default to
    # TD-LN (variant adaln, time-dependent parameters), the paper's. XL/2R and G/2R are the official
    # code's configurations (its ConvNeXt num_blocks 20 and 28 build 21 and 29 blocks); 3R: see DIMR_3R.
    td_ln = dict(backbone="multires", mlp_ratio=2.0, variant="adaln", gate_source="tdp")
    for name, (depth, width, heads, widths, depths) in {
            "XL/2R": (39, 960, 16, (480,), (21,)), "G/2R": (57, 1152, 16, (576,), (29,)), **DIMR_3R}.items():
        sizes[f"DiMR-{name}"] = dict(td_ln, depth=depth, width=width, heads=heads, branch_widths=widths,
                                     branch_depths=depths, patch_size=2 ** len(widths))
    # conv U-Nets
    sizes["UNet-S"] = dict(backbone="unet", width=64, channel_mult=(1, 2, 2), depth=2, heads=4)
    sizes["UNet-B"] = dict(backbone="unet", width=128, channel_mult=(1, 2, 2, 2), depth=2, heads=4)
    # tiny CPU sizes (tests, quickstarts)
    sizes["DiT-T/2"] = dict(backbone="flow", depth=4, width=64, heads=4, patch_size=2)
    sizes["DiT-T/4"] = dict(backbone="flow", depth=4, width=64, heads=4, patch_size=4)
    sizes["U-ViT-T/2"] = dict(backbone="u-transformer", depth=5, width=64, heads=4, patch_size=2)
    sizes["Latte-T/2"] = dict(backbone="video", depth=4, width=64, heads=4, patch_size=2)
    sizes["DiMR-T/2R"] = dict(td_ln, depth=5, width=64, heads=4, branch_widths=(32,), branch_depths=(3,),
                              patch_size=2)
    sizes["UNet-T"] = dict(backbone="unet", width=16, channel_mult=(1, 2), depth=1, heads=2)
    return sizes


MODEL_SIZES = _sizes()


def backbone_options(backbone: str) -> set[str]:
    """The keyword options a backbone takes (its constructor's, plus the unit keywords)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    params = inspect.signature(BACKBONES[backbone].__init__).parameters
    return {p for p in params if p not in ("self", "unit")} | set(UNIT_KEYS)


def build_model(size: str | None = None, **kwargs) -> nn.Module:
    """Build a backbone from a registry size and/or explicit keywords (which win over the size).

    Unit keywords (variant, gate_init, gate_source, gate_shape, fused_gates) may be given flat or as
    `unit=UnitConfig(...)`.
    """
    spec: dict = {}
    if size is not None:
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}; allowed: {', '.join(MODEL_SIZES)}")
        spec.update(MODEL_SIZES[size])
        sized = MODEL_SIZES[size].get("backbone")
        if kwargs.get("backbone") not in (None, sized):
            raise ValueError(f"model.size {size!r} is a {sized} size but model.backbone is {kwargs['backbone']!r}: "
                             f"unset the size (model.size=null) or choose a {kwargs['backbone']} size")
    spec.update(kwargs)
    backbone = spec.pop("backbone", None)
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    unit = UnitConfig.parse(spec.pop("unit", "nrdm"))
    unit_changes = {k: spec.pop(k) for k in UNIT_KEYS if k in spec}
    if unit_changes:
        unit = UnitConfig(**{**unit.__dict__, **unit_changes})
    unknown = sorted(set(spec) - backbone_options(backbone))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for backbone {backbone!r}; "
                         f"valid: {', '.join(sorted(backbone_options(backbone)))}")
    return BACKBONES[backbone](unit=unit, **spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, batch: int = 1) -> int:
    """Forward FLOPs for `batch` samples (a multiply-add counts 2, PyTorch's convention).

    DiT/fvcore report multiply-adds as "flops": divide by 2 to compare with their tables.
    """
    x, t, condition = model.example_inputs(batch)
    with explicit_attention(), FlopCounterMode(display=False) as counter:
        model(x, t, condition)
    return counter.get_total_flops()


def model_summary(model: nn.Module) -> dict:
    flops = count_flops(model)
    return {"backbone": type(model).__name__, "variant": model.unit.variant, "params": count_parameters(model),
            "gflops": flops / 1e9, "gmacs": flops / 2e9}
