"""The two FID conventions, DINOv2 through torch-fidelity's extractor, precision/recall,
R-precision, statistics files and a cache that never mixes modes (random-weight extractors, offline)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_metrics_fid import PixelFeatures, write_images

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.metrics import clip_score, feature_spaces, fid, precision_recall, stats_file


def random_uint8(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- legacy vs clean


@pytest.mark.slow
def test_inception_legacy_and_clean_differ_except_at_299(random_inception_weights):
    legacy = feature_spaces.InceptionFeatureSpace(random_inception_weights, mode="legacy")
    clean = feature_spaces.InceptionFeatureSpace(random_inception_weights, mode="clean")
    assert legacy.weights_sha256 == clean.weights_sha256  # the same Inception weights
    small = random_uint8(2, 32, seed=0)
    assert (legacy.extract(small) - clean.extract(small)).abs().max() > 1e-3
    # At the extractor's own size both resizes are the identity: the same features.
    native = random_uint8(2, feature_spaces.INCEPTION_INPUT_SIZE, seed=1)
    assert torch.equal(clean.extract(native), legacy.extract(native))
    assert "TF1" in legacy.resize and "clean-fid" in clean.resize and "bicubic" in clean.resize


def test_clean_resize_is_clean_fids_own_resizer():
    from cleanfid.resize import build_resizer

    image = random_uint8(1, 40, seed=2)
    ours = feature_spaces.clean_resize(image, 299)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, build_resizer("clean")(image[0].permute(1, 2, 0).numpy()))
    assert ours.dtype == np.float32 and not np.array_equal(ours, np.round(ours))  # not re-quantised


@pytest.fixture(scope="module")
def random_dinov2_file(tmp_path_factory):
    """A ViT-S/14 DINOv2-shaped backbone (timm layout, 518 px position grid) with random weights."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2-random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_dinov2_through_torch_fidelity_without_downloading(random_dinov2_file, monkeypatch):
    original = torch.hub.load
    backbone = feature_spaces.load_dinov2_backbone(random_dinov2_file, "dinov2-vit-s-14")
    legacy = feature_spaces.DinoV2FeatureSpace(random_dinov2_file, mode="legacy", model="dinov2-vit-s-14")
    clean = feature_spaces.DinoV2FeatureSpace(random_dinov2_file, mode="clean", model="dinov2-vit-s-14")
    assert torch.hub.load is original  # restored after torch-fidelity took the local network
    small, native = random_uint8(2, 32, seed=3), random_uint8(2, feature_spaces.DINOV2_INPUT_SIZE, seed=4)
    features = legacy.extract(small)
    assert features.shape == (2, 384) and features.std() > 0
    # A random ViT barely reacts to its input (6e-5 here), so: different at all, and bit-equal at 224.
    assert (features - clean.extract(small)).abs().max() > 1e-6
    assert torch.equal(clean.extract(native), legacy.extract(native))
    # torch-fidelity's preprocessing (ImageNet normalisation) then the CLS token of the backbone.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        direct = backbone((native.float() - mean) / std)
    torch.testing.assert_close(legacy.extract(native), direct, rtol=1e-4, atol=1e-4)


def test_dinov2_position_embedding_follows_the_hub_formula():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    resized = feature_spaces.dinov2_position_embedding(pos, 16)
    assert resized.shape == (1, 1 + 16 * 16, 8)
    torch.testing.assert_close(resized[:, :1], pos[:, :1])
    scale = 16.1 / 37
    expected = torch.nn.functional.interpolate(pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2),
                                               scale_factor=(scale, scale), mode="bicubic", antialias=False)
    torch.testing.assert_close(resized[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 8))
    assert feature_spaces.dinov2_position_embedding(pos, 37) is pos


def test_unknown_mode_is_refused(random_dinov2_file):
    with pytest.raises(UserInputError, match="unknown fid_mode 'tf'"):
        feature_spaces.DinoV2FeatureSpace(random_dinov2_file, mode="tf", model="dinov2-vit-s-14")


# --------------------------------------------------------------------------- cache


class ModePixelFeatures(PixelFeatures):
    """PixelFeatures whose numbers depend on the mode, as a real extractor's do."""

    def __init__(self, mode):
        super().__init__()
        self.fid_mode, self.resize = mode, f"{mode} resize"

    def extract(self, batch_uint8):
        return super().extract(batch_uint8) + (1.0 if self.fid_mode == "clean" else 0.0)


def test_the_cache_never_mixes_modes(tmp_path, clip2gan_home):
    folder = write_images(tmp_path / "real", 6, seed=0)
    legacy, clean = ModePixelFeatures("legacy"), ModePixelFeatures("clean")
    first = fid.folder_features(folder, legacy)
    other_mode = fid.folder_features(folder, clean)
    assert not other_mode.cache_hit and clean.n_extracted == 6
    assert not torch.allclose(first.features, other_mode.features)
    assert len(list((clip2gan_home / "stats").glob("*.npz"))) == 2
    assert fid.folder_features(folder, ModePixelFeatures("clean")).cache_hit
    again = fid.folder_features(folder, ModePixelFeatures("legacy"))
    assert again.cache_hit and torch.equal(again.features, first.features)


def test_cache_key_covers_resize_and_file_count(tmp_path):
    files = fid.list_image_files(write_images(tmp_path / "real", 4, seed=0))
    base, other_resize = ModePixelFeatures("legacy"), ModePixelFeatures("legacy")
    other_resize.resize = "another resize"
    assert fid.folder_content_hash(files, base) != fid.folder_content_hash(files, other_resize)
    assert fid.folder_content_hash(files, base) != fid.folder_content_hash(files[:3], base)


# --------------------------------------------------------------------------- precision / recall


def test_precision_recall_are_one_for_identical_sets_and_fall_for_disjoint_ones():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(60, 5, generator=generator)
    assert precision_recall.precision_recall(real.clone(), real) == {"precision": 1.0, "recall": 1.0,
                                                                    "f_score": pytest.approx(1.0)}
    half = precision_recall.precision_recall(real[:30] + torch.cat([torch.zeros(15, 5), torch.full((15, 5), 50.0)]),
                                             real)
    disjoint = precision_recall.precision_recall(real + 50.0, real)
    assert disjoint["precision"] == 0.0 and disjoint["recall"] == 0.0
    assert 0.0 < half["precision"] < 1.0


def test_precision_recall_matches_a_direct_knn_computation():
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.randn(40, 3, generator=generator), torch.randn(30, 3, generator=generator) * 1.3 + 0.4

    def covered(points, centres):  # inside any centre's ball reaching its 3rd nearest other centre
        radius = torch.cdist(centres, centres).sort(dim=1).values[:, 3]
        return (torch.cdist(points, centres) <= radius).any(dim=1).float().mean().item()

    result = precision_recall.precision_recall(fake, real)
    assert result["precision"] == pytest.approx(covered(fake, real))
    assert result["recall"] == pytest.approx(covered(real, fake))


def test_precision_recall_needs_more_than_k_images():
    with pytest.raises(UserInputError, match="at least 4 images per set; the fake set has 3"):
        precision_recall.precision_recall(torch.randn(3, 2), torch.randn(10, 2))


# --------------------------------------------------------------------------- R-precision


class FixedClip:
    """encode_text / encode_image returning fixed unit vectors (by prompt, by image mean)."""

    def __init__(self, text_vectors):
        self.text_vectors = text_vectors

    def encode_text(self, prompts):
        return torch.stack([self.text_vectors[p] for p in prompts])

    def encode_image(self, images):
        return torch.nn.functional.one_hot((images.mean(dim=(1, 2, 3)) > 0).long(), 2).float()


def test_r_precision_counts_strict_first_ranks_only():
    clip = FixedClip({"dark": torch.tensor([1.0, 0.0]), "bright": torch.tensor([0.0, 1.0]),
                      "twin": torch.tensor([0.0, 1.0])})
    dark, bright = -torch.ones(2, 3, 4, 4), torch.ones(3, 3, 4, 4)
    assert clip_score.prompt_ranked_first(clip, ["dark", "bright"], dark, 0).tolist() == [True, True]
    assert clip_score.prompt_ranked_first(clip, ["dark", "bright"], bright, 0).tolist() == [False] * 3
    # A tie with another prompt is a miss: a CLIP that cannot tell prompts apart does not score 1.
    assert clip_score.prompt_ranked_first(clip, ["dark", "bright", "twin"], bright, 1).tolist() == [False] * 3
    with pytest.raises(UserInputError, match="at least 2 prompts"):
        clip_score.prompt_ranked_first(clip, ["dark"], dark, 0)


# --------------------------------------------------------------------------- statistics files


def test_statistics_file_round_trip_and_mode_mismatch(tmp_path):
    space = ModePixelFeatures("legacy")
    features = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    statistics = fid.feature_statistics(features)
    path = stats_file.save_statistics(tmp_path / "real.npz", statistics, space, n_images=10)
    loaded = stats_file.load_statistics(path)
    np.testing.assert_allclose(loaded["mu"], statistics["mu"])
    assert loaded["mode"] == "legacy" and loaded["n_images"] == 10
    stats_file.check_statistics_match(loaded, space, path)
    with pytest.raises(UserInputError, match="made in mode legacy; this run uses clean"):
        stats_file.check_statistics_match(loaded, ModePixelFeatures("clean"), path)


def test_foreign_statistics_file_needs_mu_sigma_and_mode(tmp_path):
    np.savez(tmp_path / "nomode.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(UserInputError, match="lacks mode"):
        stats_file.load_statistics(tmp_path / "nomode.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(2), mode="legacy")
    with pytest.raises(UserInputError, match="do not form a Gaussian"):
        stats_file.load_statistics(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UserInputError, match="not an npz"):
        stats_file.load_statistics(tmp_path / "junk.npz")
