"""Interfaces to other tools' pipelines: nrdm.pipelines.diffusers_pipeline (NRDMModel, NRDMPipeline,
export_run; needs the diffusers extra)."""
