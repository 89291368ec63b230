"""Discrete VP diffusion: schedules, the training loss with the sensitivity penalty, samplers."""
from nrdm.diffusion.guidance import eps_predictor, guided_output
from nrdm.diffusion.loss import LossConfig, LossOutput, NoiseDraws, diffusion_loss, sensitivity_penalty
from nrdm.diffusion.samplers import (SAMPLERS, SPACINGS, sample, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                                     sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_euler_ancestral, sample_heun,
                                     sampling_timesteps, step_sequence)
from nrdm.diffusion.schedule import PREDICTIONS, SCHEDULES, VPSchedule
from nrdm.diffusion.variance import VARIANCES

__all__ = ["VPSchedule", "SCHEDULES", "PREDICTIONS", "LossConfig", "LossOutput", "NoiseDraws", "diffusion_loss",
           "sensitivity_penalty", "SAMPLERS", "SPACINGS", "sample", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler_ancestral", "sample_heun", "sampling_timesteps",
           "step_sequence", "eps_predictor", "guided_output", "VARIANCES"]
