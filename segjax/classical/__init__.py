"""Classical segmentation methods and dense CRF refinement.

Device methods (JAX, static shapes: jittable, one image per call, batch with `jax.vmap`):
  - thresholding: `otsu_threshold`, `multi_otsu_thresholds` (scikit-image's Otsu and
    multi-Otsu, an exact dynamic programme over histogram bins) and `apply_thresholds`
    (labels by `pixel > threshold`); `to_gray` turns RGB into luma first. For images whose classes
    differ in brightness.
  - clustering: `kmeans` / `kmeans_segment` (k-means++ seeding, Lloyd iterations) and
    `mean_shift` / `mean_shift_segment` (flat or gaussian kernel; the number of
    clusters follows from the bandwidth). Group pixels by colour, optionally with position,
    regardless of connectivity; mean shift is O(N^2) in pixels (images up to ~64x64).
  - region_growing: `region_grow`, seeded growth with a (adaptive) mean-intensity test,
    jittable and vmappable once `num_regions` is given; `seeds_from_points` (host numpy)
    builds the seed map from (row, col) points. For regions marked by a user or detector.
  - affinity: `affinity_matrix`, Shi & Malik's dense pixel affinity W [N, N] (jitted;
    small images), and `check_affinity_matrix`.
  - normalized_cut: `ncut_value`, `ncut_eigenvector` and `two_way_ncut` are jittable;
    `normalized_cut_graph` and `normalized_cut_segment` run recursive two-way
    cuts as a host loop over jitted eigen-solves. Balanced partitions of small images (O(N^3)
    per split).
  - crf: `dense_crf` / `crf_refine_labels`, fully connected CRF mean-field refinement of
    any model's logits, jitted on [B, H, W, K] batches.

Host methods (numpy / scipy / scikit-image; not jittable):
  - split_merge: `quadtree_split` (jitted quadtree split) and `split_and_merge`, whose
    greedy region-adjacency-graph merge runs on the host. Piecewise-homogeneous regions.
  - watershed: `watershed_segment` (marker watershed of the Sobel gradient) and
    `felzenszwalb_segment` (Felzenszwalb-Huttenlocher graph segmentation) call
    scikit-image unchanged; `sobel_gradient` and `h_minima_markers` give the default
    markers. Over-segmentation into superpixels or basins.
  - min_cut: `min_cut_segment` (seeded foreground/background s-t cut, Boykov & Jolly)
    and `minimum_cut` use scipy's `maximum_flow`; `global_min_cut` is a numpy
    Stoer-Wagner, showing why plain minimum cuts isolate small pieces.

Command line: `python -m segjax.classical METHOD --input IMAGE --output DIR` runs one
method on an image file and writes the label map and an overlay (see `__main__.py`).

The two feature helpers share the name `pixel_features` and stay in their modules:
`clustering.pixel_features` (colour / position features for clustering) and
`affinity.pixel_features` (intensity / HSV-cone features for affinities).
"""
from segjax.classical.affinity import affinity_matrix, check_affinity_matrix
from segjax.classical.clustering import kmeans, kmeans_segment, mean_shift, mean_shift_segment
from segjax.classical.crf import crf_refine_labels, dense_crf
from segjax.classical.min_cut import global_min_cut, min_cut_segment, minimum_cut
from segjax.classical.normalized_cut import ncut_eigenvector, ncut_value
from segjax.classical.normalized_cut import (normalized_cut_graph, normalized_cut_segment,
                                             two_way_ncut)
from segjax.classical.region_growing import region_grow, seeds_from_points
from segjax.classical.split_merge import quadtree_split, split_and_merge
from segjax.classical.thresholding import (apply_thresholds, multi_otsu_thresholds,
                                           otsu_threshold, to_gray)
from segjax.classical.watershed import (felzenszwalb_segment, h_minima_markers, sobel_gradient,
                                        watershed_segment)

__all__ = [
    "affinity_matrix", "apply_thresholds", "check_affinity_matrix", "crf_refine_labels",
    "dense_crf", "felzenszwalb_segment", "global_min_cut", "h_minima_markers", "kmeans",
    "kmeans_segment", "mean_shift", "mean_shift_segment", "min_cut_segment", "minimum_cut",
    "multi_otsu_thresholds", "ncut_eigenvector", "ncut_value", "normalized_cut_graph",
    "normalized_cut_segment", "otsu_threshold", "quadtree_split", "region_grow",
    "seeds_from_points", "sobel_gradient", "split_and_merge", "to_gray", "two_way_ncut",
    "watershed_segment",
]
