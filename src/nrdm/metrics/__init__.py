"""Sample-quality metrics (FID, KID, IS, precision/recall, sFID, class accuracy, FVD), feature
networks (TorchScript Inception / I3D from local files, built-in domain networks) and evaluation."""
from nrdm.metrics.distances import (GaussianStats, frechet_distance, inception_score, kernel_inception_distance,
                                    precision_recall)
from nrdm.metrics.evaluate import compute_metrics, evaluate, reference_features
from nrdm.metrics.features import DomainNetwork, TorchScriptI3D, TorchScriptInception, domain_network

__all__ = ["GaussianStats", "frechet_distance", "inception_score", "kernel_inception_distance", "precision_recall",
           "compute_metrics", "evaluate", "reference_features", "DomainNetwork", "TorchScriptI3D",
           "TorchScriptInception", "domain_network"]
