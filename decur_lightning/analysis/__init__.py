"""Analyses of what DeCUR learns (paper Section 7, Appendix D, Algorithm 2).

Modalities are addressed by name; the cross-modal analyses are made for every pair of a
model's modalities (:mod:`.pairs`), so they hold for ``M >= 2`` modalities.

- cross-modal alignment per embedding dimension, eq. 7 (:mod:`.alignment`, Fig. 5a, 7);
- t-SNE of embedding dimensions (:mod:`.tsne`, Fig. 1, 8);
- GradCAM and Integrated Gradients saliency of the common and unique outputs
  (:mod:`.saliency`, Fig. 6; needs ``pip install decur-lightning[analysis]``);
- band permutation importance of the common and unique blocks (:mod:`.band_permutation`), the
  check of band importance against data with a known answer;
- linear probes of known factors on the synthetic data (:mod:`.decoupling`);
- the first principal component of RDA feature maps with the deformable sampling points
  (:mod:`.rda`, Fig. 5b);
- :func:`analyze`: all of them on a checkpoint, with figures and ``statistics.json``; on the
  command line ``python -m decur_lightning.analysis --help``.
"""

from .alignment import (
    alignment_for_model,
    alignment_histogram_figure,
    alignment_loss_per_dimension,
    alignment_per_pair,
    alignment_statistics,
    collect_embeddings,
    plot_alignment_histogram,
    summarize,
)
from .band_permutation import band_permutation_importance
from .common_ratio import CommonRatioEstimate, estimate_common_ratio
from .decoupling import extract_features, probe_factors, probe_fusion, ridge_r2
from .pairs import check_modality, model_pairs, pair_label
from .plotting import figure_to_array, save_figure
from .rda import (
    RDAFeaturePoints,
    first_principal_component,
    is_rda_encoder,
    rda_feature_points,
    rda_feature_points_figure,
    rda_feature_points_for_module,
    rda_figure_for_checkpoint,
)
from .report import analyze, load_ssl_module
from .saliency import (
    COMMON,
    UNIQUE,
    CommonUniqueOutput,
    SaliencyResult,
    TargetLayer,
    band_importance,
    band_importance_figure,
    band_truth_score,
    default_target_layer,
    degenerate_maps,
    gradcam,
    integrated_gradients,
    modality_common_dims,
    overlap_histogram_figure,
    saliency_analysis,
    saliency_examples_figure,
    saliency_overlap,
    select_target_layer,
    stage_layers,
)
from .tsne import DimensionTSNE, dimension_tsne, dimension_tsne_figure, tsne_groups

__all__ = [
    "COMMON",
    "UNIQUE",
    "CommonUniqueOutput",
    "DimensionTSNE",
    "RDAFeaturePoints",
    "SaliencyResult",
    "TargetLayer",
    "alignment_for_model",
    "alignment_histogram_figure",
    "alignment_loss_per_dimension",
    "alignment_per_pair",
    "alignment_statistics",
    "analyze",
    "band_importance",
    "band_importance_figure",
    "band_permutation_importance",
    "band_truth_score",
    "check_modality",
    "collect_embeddings",
    "default_target_layer",
    "degenerate_maps",
    "dimension_tsne",
    "dimension_tsne_figure",
    "CommonRatioEstimate",
    "estimate_common_ratio",
    "extract_features",
    "figure_to_array",
    "first_principal_component",
    "gradcam",
    "integrated_gradients",
    "is_rda_encoder",
    "load_ssl_module",
    "modality_common_dims",
    "model_pairs",
    "overlap_histogram_figure",
    "pair_label",
    "plot_alignment_histogram",
    "probe_factors",
    "probe_fusion",
    "rda_feature_points",
    "rda_feature_points_figure",
    "rda_feature_points_for_module",
    "rda_figure_for_checkpoint",
    "ridge_r2",
    "saliency_analysis",
    "saliency_examples_figure",
    "saliency_overlap",
    "save_figure",
    "select_target_layer",
    "stage_layers",
    "summarize",
    "tsne_groups",
]
