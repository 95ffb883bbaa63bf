"""FID / KID (metrics/fid.py): the properties a distance must have, agreement with torch-fidelity
and an independent scipy Frechet distance, bad folders, mixed sizes, and the real-folder cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clip2gan_cli.errors import ImageError, UserInputError
from clip2gan_cli.metrics import fid


class PixelFeatures(fid.FeatureSpace):
    """A cheap stand-in feature space: 4x4 average-pooled pixels (48-d); counts extracted images."""

    name = "pixels-test"
    weights_sha256 = "0" * 64

    def __init__(self):
        self.n_extracted = 0

    def extract(self, batch_uint8):
        self.n_extracted += batch_uint8.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(batch_uint8.float() / 255.0, 4)
        return pooled.flatten(1)


def write_images(folder: Path, count: int, seed: int, size=(24, 24), shift: float = 0.0) -> Path:
    """`count` random smooth RGB PNGs (brightness offset by `shift` in [0, 255] units)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.uniform(0, 200, size=(4, 4, 3))
        pixels = np.kron(coarse, np.ones((size[1] // 4 + 1, size[0] // 4 + 1, 1)))[:size[1], :size[0]]
        pixels = np.clip(pixels + shift + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img_{index:03d}.png")
    return folder


def scipy_frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Independent Frechet distance: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    from scipy import linalg

    features_a, features_b = features_a.astype(np.float64), features_b.astype(np.float64)
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a, sigma_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * covmean))


def gram_frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Independent Frechet distance through the n x n Gram trick (exact, cheap when n << d).

    With S = A A^T (A: centred features^T / sqrt(n - 1)), Tr S = ||A||_F^2 and
    Tr sqrtm(S_a S_b) = the nuclear norm of A_a^T A_b (same non-zero spectrum).
    """
    def centred(features):
        features = features.astype(np.float64)
        return (features - features.mean(0)).T / np.sqrt(len(features) - 1), features.mean(0)

    (a, mu_a), (b, mu_b) = centred(features_a), centred(features_b)
    nuclear = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    return float(((mu_a - mu_b) ** 2).sum() + (a ** 2).sum() + (b ** 2).sum() - 2 * nuclear)


def numpy_kid_full_sets(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 over the whole sets."""
    features_a, features_b = features_a.astype(np.float64), features_b.astype(np.float64)
    dim, m = features_a.shape[1], features_a.shape[0]
    kernel = lambda x, y: (x @ y.T / dim + 1.0) ** 3  # noqa: E731
    k_aa, k_bb, k_ab = kernel(features_a, features_a), kernel(features_b, features_b), kernel(features_a, features_b)
    return float((k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
                 - 2 * k_ab.sum() / (m * m))


# --------------------------------------------------------------------------- distance properties


def test_fid_of_a_set_against_itself_is_zero(tmp_path):
    features = fid.folder_features(write_images(tmp_path / "a", 12, seed=0), PixelFeatures(), cache=False)
    assert abs(fid.frechet_distance(features.features, features.features)) < 1e-6


def test_fid_is_symmetric(tmp_path):
    space = PixelFeatures()
    a = fid.folder_features(write_images(tmp_path / "a", 12, seed=0), space, cache=False).features
    b = fid.folder_features(write_images(tmp_path / "b", 12, seed=1, shift=30), space, cache=False).features
    assert fid.frechet_distance(a, b) == pytest.approx(fid.frechet_distance(b, a), rel=1e-6)
    assert fid.frechet_distance(a, b) > 0.01


def test_fid_grows_as_one_set_is_shifted(tmp_path):
    space = PixelFeatures()
    real = fid.folder_features(write_images(tmp_path / "real", 12, seed=0), space, cache=False).features
    distances = []
    for shift in (0, 15, 30, 60):
        shifted = fid.folder_features(write_images(tmp_path / f"s{shift}", 12, seed=0, shift=shift),
                                      space, cache=False).features
        distances.append(fid.frechet_distance(real, shifted))
    assert distances[0] < 1e-6
    assert all(later > earlier for earlier, later in zip(distances, distances[1:])), distances


def test_frechet_distance_equals_independent_scipy_computation():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(40, 8, generator=generator)
    b = torch.randn(30, 8, generator=generator) * 1.5 + 0.3
    assert fid.frechet_distance(a, b) == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-4)
    assert fid.frechet_distance(a, b) == pytest.approx(gram_frechet(a.numpy(), b.numpy()), rel=1e-4)


def test_kid_over_whole_sets_equals_independent_numpy_mmd():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(20, 6, generator=generator)
    b = torch.randn(20, 6, generator=generator) + 0.5
    # One subset of the whole set: a permutation, which MMD does not see.
    kid_mean, kid_std = fid.kernel_distance(a, b, subset_size=20, subsets=1, seed=3)
    assert kid_mean == pytest.approx(numpy_kid_full_sets(a.numpy(), b.numpy()), rel=1e-4)
    assert kid_std == 0.0


def test_kid_is_reproducible_for_a_seed():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 6, generator=generator), torch.randn(30, 6, generator=generator)
    assert fid.kernel_distance(a, b, 10, 5, seed=7) == fid.kernel_distance(a, b, 10, 5, seed=7)


# --------------------------------------------------------------------------- minimums and bad folders


def test_fid_with_one_image_says_the_minimum_is_two(tmp_path):
    with pytest.raises(UserInputError, match="at least 2 images"):
        fid.frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(UserInputError, match="FID needs at least 2 images per set; .*one has 1"):
        fid.folder_features(write_images(tmp_path / "one", 1, seed=0), PixelFeatures(), cache=False)


def test_kid_subset_larger_than_a_set_says_the_minimum():
    with pytest.raises(UserInputError, match="at least 50 images per set.*has 10"):
        fid.kernel_distance(torch.randn(60, 4), torch.randn(10, 4), subset_size=50, subsets=2)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        fid.folder_features(tmp_path / "nowhere", PixelFeatures())


def test_folder_without_images_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserInputError, match="holds no images"):
        fid.folder_features(tmp_path / "empty", PixelFeatures())


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    folder = write_images(tmp_path / "mixed", 6, seed=0)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "empty.jpg").write_bytes(b"")
    result = fid.folder_features(folder, PixelFeatures(), cache=False)
    assert (result.n_images, result.n_skipped) == (6, 2)


def test_folder_of_only_unreadable_files_is_an_image_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    with pytest.raises(ImageError, match="no readable image.*1 unreadable"):
        fid.folder_features(tmp_path / "bad", PixelFeatures(), cache=False)


def test_mixed_sizes_give_each_image_the_features_it_has_alone(tmp_path):
    folder = write_images(tmp_path / "m", 3, seed=0, size=(24, 24))
    write_images(tmp_path / "tmp", 3, seed=1, size=(40, 32))
    for index, path in enumerate(sorted((tmp_path / "tmp").iterdir())):
        path.rename(folder / f"img_{index:03d}b.png")  # interleave sizes in name order
    space = PixelFeatures()
    result = fid.folder_features(folder, space, batch_size=4, cache=False)
    one_by_one = torch.cat([space.extract(fid.read_rgb_uint8(path)[None])
                            for path in fid.list_image_files(folder)])
    assert result.n_images == 6
    torch.testing.assert_close(result.features, one_by_one)


# --------------------------------------------------------------------------- cache


def test_real_folder_statistics_are_cached_by_content(tmp_path, clip2gan_home):
    folder = write_images(tmp_path / "real", 8, seed=0)
    space = PixelFeatures()
    first = fid.folder_features(folder, space)
    assert not first.cache_hit and space.n_extracted == 8
    assert len(list((clip2gan_home / "stats").glob("*.npz"))) == 1
    second = fid.folder_features(folder, space)
    assert second.cache_hit and space.n_extracted == 8  # nothing extracted again
    torch.testing.assert_close(second.features, first.features)
    np.testing.assert_array_equal(second.statistics["sigma"], first.statistics["sigma"])
    # Changing one file's bytes is a different dataset.
    write_images(tmp_path / "other", 1, seed=9)
    (tmp_path / "other" / "img_000.png").replace(folder / "img_003.png")
    third = fid.folder_features(folder, space)
    assert not third.cache_hit and space.n_extracted == 16


def test_cache_key_depends_on_the_feature_weights(tmp_path):
    folder = write_images(tmp_path / "real", 4, seed=0)
    files = fid.list_image_files(folder)
    space_a, space_b = PixelFeatures(), PixelFeatures()
    space_b.weights_sha256 = "1" * 64
    assert fid.folder_content_hash(files, space_a) != fid.folder_content_hash(files, space_b)


def test_a_corrupt_cache_file_is_recomputed(tmp_path, clip2gan_home):
    folder = write_images(tmp_path / "real", 4, seed=0)
    space = PixelFeatures()
    fid.folder_features(folder, space)
    (cache_file,) = (clip2gan_home / "stats").glob("*.npz")
    cache_file.write_bytes(b"not an npz")
    again = fid.folder_features(folder, space)
    assert not again.cache_hit and again.n_images == 4


# --------------------------------------------------------------------------- Inception (torch-fidelity)


@pytest.mark.slow
def test_inception_fid_and_kid_equal_a_direct_torch_fidelity_call(tmp_path, random_inception_weights):
    import torch_fidelity

    real = write_images(tmp_path / "real", 3, seed=0, size=(32, 32))
    fake = write_images(tmp_path / "fake", 3, seed=1, size=(32, 32), shift=25)
    space = fid.InceptionFeatureSpace(random_inception_weights, device="cpu")
    real_features = fid.folder_features(real, space, batch_size=8, cache=False)
    fake_features = fid.folder_features(fake, space, batch_size=8, cache=False)
    ours_fid = fid.frechet_distance_from_statistics(real_features.statistics, fake_features.statistics)
    ours_kid = fid.kernel_distance(real_features.features, fake_features.features, subset_size=2, subsets=10,
                                   seed=123)

    direct = torch_fidelity.calculate_metrics(
        input1=str(real), input2=str(fake), cuda=False, fid=True, kid=True, kid_subset_size=2, kid_subsets=10,
        rng_seed=123, feature_extractor_weights_path=str(random_inception_weights), cache=False,
        verbose=False, save_cpu_ram=True, batch_size=8)
    assert real_features.features.shape == (3, 2048) and real_features.features.std() > 1e-3
    assert ours_fid > 0
    # Same images, same batches, same extractor and statistics code: the same bits.
    assert ours_fid == pytest.approx(direct["frechet_inception_distance"], rel=1e-9)
    assert ours_kid[0] == pytest.approx(direct["kernel_inception_distance_mean"], rel=1e-9, abs=1e-12)
    assert ours_kid[1] == pytest.approx(direct["kernel_inception_distance_std"], rel=1e-9, abs=1e-12)
    # 2048-d with 3 samples: scipy's sqrtm of the singular product is slow and inexact; the Gram form is exact.
    assert ours_fid == pytest.approx(gram_frechet(real_features.features.numpy(), fake_features.features.numpy()),
                                     rel=1e-3)


def test_inception_weights_that_are_not_a_state_dict_are_refused(tmp_path):
    from clip2gan_cli.errors import CheckpointError, WeightsNotFoundError

    path = tmp_path / "evil.pth"
    torch.save({"model": object()}, path)  # needs unpickling of arbitrary objects
    with pytest.raises(CheckpointError, match="not a plain state dict; nothing was executed"):
        fid.InceptionFeatureSpace(path)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        fid.InceptionFeatureSpace(tmp_path / "missing.pth")
