"""FID, KID and the real-folder cache, with torch-fidelity's statistics in any feature space.

torch-fidelity does the statistics (`fid_features_to_statistics`, `fid_statistics_to_metric`,
`kid_features_to_metric`); the feature spaces (`feature_spaces`: Inception and DINOv2 through
torch-fidelity's extractors, the pack's CLIP for FD_CLIP, Kynkaanniemi et al. 2023) say how an
image becomes a vector and under which resize convention (`fid_mode`). This module adds what
torch-fidelity's folder input lacks: images of mixed sizes, unreadable files skipped with a count,
and a content-hash cache of a real folder's features whose key holds the feature space, its
weights' hash, the fid mode, the resize and the file count, so two conventions never share an entry.

Features come back in sorted file-name order, whatever the batching, so KID's random subsets
match torch-fidelity's. Minimum set sizes: FID needs at least 2 images per set (a covariance);
KID needs at least `kid_subset_size` images per set (default 1000, as torch-fidelity and the KID
paper use).
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import ImageError, UserInputError
from ..fileutil import atomic_savez
# ClipFeatureSpace and InceptionFeatureSpace: re-exported for bench/shapes_quality.py and the tests.
from .feature_spaces import ClipFeatureSpace, FeatureSpace, InceptionFeatureSpace, extract_features  # noqa: F401
from .images import list_image_files, read_rgb_uint8

if TYPE_CHECKING:  # torch is imported lazily (the CLI imports this module inside a command)
    import torch

# FID needs a covariance: at least two images per set.
MIN_IMAGES_FID = 2
# KID defaults of torch-fidelity (and of Binkowski et al. 2018).
DEFAULT_KID_SUBSETS = 100
DEFAULT_KID_SUBSET_SIZE = 1000
# Bump when the cached file layout or the way features are computed changes (2: fid mode and resize in the key).
STATS_CACHE_VERSION = 2


# --------------------------------------------------------------------------- statistics (torch-fidelity)


def check_enough_images(n_images: int, minimum: int, what: str, metric: str) -> None:
    """Raise UserInputError when a set is too small for a metric, naming the minimum."""
    if n_images < minimum:
        raise UserInputError(f"{metric} needs at least {minimum} images per set; {what} has {n_images}")


def feature_statistics(features: "torch.Tensor") -> dict:
    """Mean and covariance of features, by torch-fidelity (`fid_features_to_statistics`)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.float().cpu())


def frechet_distance_from_statistics(stats_a: dict, stats_b: dict) -> float:
    """Frechet distance between two Gaussians, by torch-fidelity (`fid_statistics_to_metric`)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if any(stats_a[key].dtype != stats_b[key].dtype for key in ("mu", "sigma")):  # a file from another tool
        stats_a, stats_b = ({key: stats[key].astype("float64") for key in ("mu", "sigma")}
                            for stats in (stats_a, stats_b))
    if stats_a["mu"].shape != stats_b["mu"].shape:
        raise UserInputError(f"the statistics have {stats_a['mu'].shape[0]} dimensions, the features "
                             f"{stats_b['mu'].shape[0]}: made by another feature extractor")
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])


def frechet_distance(features_a: "torch.Tensor", features_b: "torch.Tensor") -> float:
    """FID (or FD_CLIP) between two feature sets [N, D] (each needs N >= 2)."""
    check_enough_images(len(features_a), MIN_IMAGES_FID, "the first set", "FID")
    check_enough_images(len(features_b), MIN_IMAGES_FID, "the second set", "FID")
    return frechet_distance_from_statistics(feature_statistics(features_a), feature_statistics(features_b))


def kernel_distance(features_a: "torch.Tensor", features_b: "torch.Tensor",
                    subset_size: int = DEFAULT_KID_SUBSET_SIZE, subsets: int = DEFAULT_KID_SUBSETS,
                    seed: int = 2020) -> tuple[float, float]:
    """KID (mean, std over random subsets) by torch-fidelity (`kid_features_to_metric`)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if subset_size < 2:
        raise UserInputError(f"`kid_subset_size` must be >= 2, got {subset_size}")
    if subsets < 1:
        raise UserInputError(f"`kid_subsets` must be >= 1, got {subsets}")
    for features, what in ((features_a, "the real set"), (features_b, "the fake set")):
        if len(features) < subset_size:
            raise UserInputError(
                f"KID with subset size {subset_size} needs at least {subset_size} images per set; "
                f"{what} has {len(features)}", hint="lower `kid_subset_size`")
    metric = kid_features_to_metric(features_a.cpu(), features_b.cpu(), kid_subsets=subsets,
                                    kid_subset_size=subset_size, rng_seed=seed, verbose=False)
    return float(metric[KEY_METRIC_KID_MEAN]), float(metric[KEY_METRIC_KID_STD])


# --------------------------------------------------------------------------- real-folder cache


@dataclass
class FolderFeatures:
    """Features of an image folder, their torch-fidelity statistics and the read counts."""

    features: "torch.Tensor"
    statistics: dict
    n_images: int
    n_skipped: int
    cache_hit: bool = False


def folder_content_hash(files: Sequence[Path], space: FeatureSpace, progress: bool = False) -> str:
    """sha256 over sorted file names and bytes, the file count, the feature space (kind, model), its
    weights' hash, its fid mode and its resize: one convention's statistics never answer another's."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    digest.update(f"clip2gan-stats-v{STATS_CACHE_VERSION}|{space.name}|{space.description}|"
                  f"{space.weights_sha256}|mode={space.fid_mode}|resize={space.resize}|n={len(files)}|".encode())
    for path in tqdm(sorted(files, key=lambda p: p.name), desc="hashing", unit="file", file=sys.stderr,
                     disable=not progress, leave=False):
        digest.update(f"{path.name}|{path.stat().st_size}|".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stats_cache_dir() -> Path:
    """Where real-folder statistics are cached: `<cache_dir>/stats/`."""
    from .. import weights

    return Path(weights.cache_dir()) / "stats"


def _load_cached(path: Path) -> FolderFeatures | None:
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as archive:
            return FolderFeatures(
                features=torch.from_numpy(archive["features"].copy()),
                statistics={"mu": archive["mu"].copy(), "sigma": archive["sigma"].copy()},
                n_images=int(archive["n_images"]), n_skipped=int(archive["n_skipped"]), cache_hit=True)
    except (OSError, ValueError, KeyError):  # a corrupt or old cache file is recomputed, not fatal
        return None


def _save_cached(path: Path, folder_features: FolderFeatures) -> None:
    atomic_savez(path, features=folder_features.features.numpy(),
                 mu=folder_features.statistics["mu"], sigma=folder_features.statistics["sigma"],
                 n_images=folder_features.n_images, n_skipped=folder_features.n_skipped)


def _extract_folder(folder, files: Sequence[Path], space: FeatureSpace, batch_size: int,
                    progress: bool) -> tuple["torch.Tensor", int, int]:
    """Stream `files` through `space`, `batch_size` files at a time: (features, n_read, n_skipped).

    Only one chunk of decoded images is in memory at a time, so folders of any size fit.
    """
    import torch
    from tqdm import tqdm

    chunks, n_images, n_skipped = [], 0, 0
    with tqdm(total=len(files), desc=f"{space.name} features ({Path(folder).name})", unit="img",
              file=sys.stderr, disable=not progress, leave=False) as bar:
        for start in range(0, len(files), batch_size):
            images = []
            for path in files[start:start + batch_size]:
                try:
                    images.append(read_rgb_uint8(path))
                except ImageError:  # missing, truncated, not an image, too large or too small: counted
                    n_skipped += 1
            if images:
                chunks.append(extract_features(images, space, batch_size=batch_size))
                n_images += len(images)
            bar.update(min(batch_size, len(files) - start))
    return (torch.cat(chunks) if chunks else torch.zeros(0, 0)), n_images, n_skipped


def folder_features(folder: str | os.PathLike, space: FeatureSpace, batch_size: int = 32,
                    cache: bool = True, cache_root: str | os.PathLike | None = None,
                    progress: bool = False) -> FolderFeatures:
    """Features and statistics of every readable image in `folder`, cached by content hash.

    The cache key covers file names and bytes, the feature space and its weights, so editing,
    adding or removing a file, or changing weights, recomputes.
    """
    files = list_image_files(folder)
    cache_file = None
    if cache:
        key = folder_content_hash(files, space, progress=progress)
        cache_file = Path(cache_root if cache_root is not None else stats_cache_dir()) / f"{key}.npz"
        if cache_file.is_file():
            cached = _load_cached(cache_file)
            if cached is not None:
                return cached
    features, n_images, n_skipped = _extract_folder(folder, files, space, batch_size, progress)
    if n_images == 0:
        raise ImageError(f"no readable image in {folder} ({n_skipped} unreadable files skipped)")
    check_enough_images(n_images, MIN_IMAGES_FID, str(folder), "FID")  # a covariance needs two
    result = FolderFeatures(features=features, statistics=feature_statistics(features),
                            n_images=n_images, n_skipped=n_skipped)
    if cache_file is not None:
        _save_cached(cache_file, result)
    return result
