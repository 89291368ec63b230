"""Discrete VP diffusion: schedules, the training loss with the sensitivity penalty, samplers."""
from nrdm.diffusion.guidance import eps_predictor, guided_output
from nrdm.diffusion.loss import LossConfig, LossOutput, NoiseDraws, diffusion_loss, sensitivity_penalty
from nrdm.diffusion.samplers import (SAMPLERS, sample, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                                     sampling_timesteps)
from nrdm.diffusion.schedule import PREDICTIONS, SCHEDULES, VPSchedule

__all__ = ["VPSchedule", "SCHEDULES", "PREDICTIONS", "LossConfig", "LossOutput", "NoiseDraws", "diffusion_loss",
           "sensitivity_penalty", "SAMPLERS", "sample", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sampling_timesteps", "eps_predictor", "guided_output"]
