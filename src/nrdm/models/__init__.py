"""Backbones built from one gated residual unit (`gated_unit.py`)."""
from nrdm.models.flow_transformer import FlowTransformer
from nrdm.models.gated_unit import (VARIANTS, Conditioning, GatedResidual, UnitConfig, gated_units,
                                    no_weight_decay_names)
from nrdm.models.registry import (BACKBONES, MODEL_SIZES, build_model, count_flops, count_parameters,
                                  model_summary)
from nrdm.models.tracing import UnitTracer
from nrdm.models.u_transformer import UShapedTransformer
from nrdm.models.unet import UNet
from nrdm.models.video_transformer import VideoTransformer

__all__ = ["VARIANTS", "BACKBONES", "MODEL_SIZES", "Conditioning", "GatedResidual", "UnitConfig", "UnitTracer",
           "FlowTransformer", "UShapedTransformer", "UNet", "VideoTransformer", "build_model", "count_flops", "count_parameters",
           "model_summary", "gated_units", "no_weight_decay_names"]
