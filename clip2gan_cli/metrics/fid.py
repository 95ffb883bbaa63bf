"""FID and KID with torch-fidelity, in Inception or CLIP feature space.

torch-fidelity does the statistics (`fid_features_to_statistics`, `fid_statistics_to_metric`,
`kid_features_to_metric`) and, for `--features inception`, the feature extraction too (its
`inception-v3-compat` extractor, loaded from the registry's local `inception-fid` file, never
downloaded by torch-fidelity itself). This module adds what torch-fidelity's folder input
lacks: images of mixed sizes, unreadable files skipped with a count, a CLIP feature space
(FD_CLIP, Kynkaanniemi et al. 2023) and a content-hash cache of a real folder's features.

How images reach an extractor (the same for real and fake sets, so sizes never bias a metric):
each file is read by `imageio.read_image` as 8-bit RGB (as torch-fidelity's folder input does;
files it refuses: corrupt, not an image, under 16 px, decompression bombs, are skipped and
counted). Images are batched with others of the same size and each batch is resized by the
extractor itself to its input resolution, with the same resampling for every image:
Inception uses torch-fidelity's TensorFlow-1.x compatible bilinear resize to 299x299 (a
non-square image is stretched), CLIP uses the pack's `encode_image` preprocessing (centre square
crop, antialiased bicubic resize). Features come back in sorted file-name order, whatever the
batching, so KID's random subsets match torch-fidelity's.

Minimum set sizes: FID needs at least 2 images per set (a covariance); KID needs at least
`kid_subset_size` images per set (default 1000, as torch-fidelity and the KID paper use).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import CheckpointError, ImageError, UserInputError, WeightsNotFoundError, first_line
from ..fileutil import atomic_path, sha256_file

if TYPE_CHECKING:  # torch is imported lazily (the CLI imports this module inside a command)
    import numpy as np
    import torch

# File extensions read from a folder (lower-cased suffix, without the dot).
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
# FID needs a covariance: at least two images per set.
MIN_IMAGES_FID = 2
# KID defaults of torch-fidelity (and of Binkowski et al. 2018).
DEFAULT_KID_SUBSETS = 100
DEFAULT_KID_SUBSET_SIZE = 1000
# Bump when the cached file layout or the way features are computed changes.
STATS_CACHE_VERSION = 1
# torch-fidelity's Inception layer used for FID and KID (pool3, 2048-d).
INCEPTION_FEATURE_LAYER = "2048"


# --------------------------------------------------------------------------- images


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name.

    Raises UserInputError when the folder is missing, not a folder, or holds no image file.
    """
    directory = Path(folder)
    if not directory.exists():
        raise UserInputError(f"image folder {directory} does not exist")
    if not directory.is_dir():
        raise UserInputError(f"{directory} is not a folder")
    files = sorted(
        (path for path in directory.iterdir()
         if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS),
        key=lambda path: path.name,
    )
    if not files:
        raise UserInputError(f"image folder {directory} holds no images",
                             hint=f"expected files ending in {', '.join('.' + e for e in IMAGE_EXTENSIONS)}")
    return files


def read_rgb_uint8(path: str | os.PathLike) -> "torch.Tensor":
    """One image file as a uint8 tensor [3, H, W] via the project's safe reader (ImageError if unreadable)."""
    import numpy as np
    import torch

    from ..imageio import read_image

    array = np.asarray(read_image(path), dtype=np.uint8)  # [H, W, 3], 8-bit RGB
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def images_to_uint8(images: "torch.Tensor") -> "torch.Tensor":
    """Quantise generator output in [-1, 1] to uint8 exactly as a saved PNG would hold it."""
    import torch

    from ..imageio import to_uint8

    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- feature spaces


class FeatureSpace:
    """An image -> feature-vector map: uint8 RGB batches [N, 3, H, W] in, float32 [N, D] out.

    `name` is the `--features` kind; `description` names the exact model and layer; both and
    `weights_sha256` (the exact weights) go into the real-folder cache key.
    """

    name: str = ""
    description: str = ""
    weights_sha256: str = ""

    def extract(self, batch_uint8: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError


@contextlib.contextmanager
def _torch_fidelity_cannot_download() -> Iterator[None]:
    """Make torch-fidelity's Inception loader fail instead of downloading (belt and braces)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    def refuse(url, *args, **kwargs):
        raise WeightsNotFoundError(f"torch-fidelity tried to download {url}; clip2gan passes weights locally")

    original = inception_module.load_state_dict_from_url
    inception_module.load_state_dict_from_url = refuse
    try:
        yield
    finally:
        inception_module.load_state_dict_from_url = original




class InceptionFeatureSpace(FeatureSpace):
    """torch-fidelity's `inception-v3-compat` extractor (pool3, 2048-d) with local weights."""

    name = "inception"
    description = f"torch-fidelity inception-v3-compat, layer {INCEPTION_FEATURE_LAYER}"

    def __init__(self, weights_path: str | os.PathLike, device: "torch.device | str" = "cpu",
                 weights_sha256: str | None = None):
        import torch
        from torch_fidelity.utils import create_feature_extractor

        from ..device import place_model

        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise WeightsNotFoundError(f"Inception weights file {weights_path} does not exist",
                                       hint="clip2gan download-weights inception-fid")
        # torch-fidelity unpickles with weights_only=False; check the file holds only tensors first.
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"Inception weights {weights_path} are not a plain state dict; nothing was "
                                  f"executed ({first_line(error, 160)})") from error
        with _torch_fidelity_cannot_download():
            extractor = create_feature_extractor(
                "inception-v3-compat", [INCEPTION_FEATURE_LAYER], cuda=False,
                feature_extractor_weights_path=str(weights_path), verbose=False)
        self.device = torch.device(device)
        self.extractor = place_model(extractor, self.device)
        self.weights_sha256 = weights_sha256 or sha256_file(weights_path)

    def extract(self, batch_uint8: "torch.Tensor") -> "torch.Tensor":
        import torch

        with torch.no_grad():
            (features,) = self.extractor(batch_uint8.to(self.device))
        return features.float().cpu()


class ClipFeatureSpace(FeatureSpace):
    """The pack's CLIP image embedding (L2-normalised, as `ClipModel.encode_image` returns it).

    The Frechet distance in this space is FD_CLIP (Kynkaanniemi et al. 2023).
    """

    name = "clip"

    def __init__(self, clip_model, weights_sha256: str, device: "torch.device | str" = "cpu"):
        import torch

        self.clip = clip_model
        self.device = torch.device(device)
        self.weights_sha256 = weights_sha256
        self.description = (f"{getattr(clip_model, 'name', 'clip')} image embedding "
                            f"(L2-normalised, {getattr(clip_model, 'image_size', '?')} px input)")

    def extract(self, batch_uint8: "torch.Tensor") -> "torch.Tensor":
        import torch

        images = batch_uint8.to(self.device).float() / 127.5 - 1.0  # uint8 -> [-1, 1] (encode_image's range)
        with torch.no_grad():
            features = self.clip.encode_image(images)
        return features.float().cpu()


def state_dict_sha256(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes): identifies its weights."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def extract_features(images: Sequence["torch.Tensor"], space: FeatureSpace, batch_size: int = 32) -> "torch.Tensor":
    """Features [N, D] of uint8 images [3, H, W], in input order; same-size images share batches."""
    import torch

    if batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {batch_size}")
    indices_by_size: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        indices_by_size.setdefault(tuple(image.shape), []).append(index)
    rows: list = [None] * len(images)
    for indices in indices_by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            features = space.extract(torch.stack([images[i] for i in chunk]))
            for row, index in zip(features, chunk):
                rows[index] = row
    return torch.stack(rows) if rows else torch.zeros(0, 0)


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
        raise UserInputError(f"--kid-subset-size must be >= 2, got {subset_size}")
    if subsets < 1:
        raise UserInputError(f"--kid-subsets must be >= 1, got {subsets}")
    for features, what in ((features_a, "the real set"), (features_b, "the fake set")):
        if len(features) < subset_size:
            raise UserInputError(
                f"KID with subset size {subset_size} needs at least {subset_size} images per set; "
                f"{what} has {len(features)}", hint="lower --kid-subset-size")
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
    """sha256 over sorted file names and bytes, the feature space (kind, model) and its weights' hash."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    digest.update(f"clip2gan-stats-v{STATS_CACHE_VERSION}|{space.name}|{space.description}|"
                  f"{space.weights_sha256}|".encode())
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
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a handle, so numpy does not append ".npz" to the temp name
            np.savez(handle, features=folder_features.features.numpy(),
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
