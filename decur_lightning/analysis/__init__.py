"""Analyses of what DeCUR learns (paper Section 7, Appendix D)."""

from .alignment import alignment_loss_per_dimension, collect_embeddings, plot_alignment_histogram

__all__ = ["alignment_loss_per_dimension", "collect_embeddings", "plot_alignment_histogram"]
