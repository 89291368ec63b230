"""Depth-scaling lab: resumable grids over residual variants, depths, penalty weights and seeds."""
