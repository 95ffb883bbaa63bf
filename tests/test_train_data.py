"""Training data: folder scanning (recursive, formats, unreadable files), crop/resize, the seeded
step-indexed batch order (resumable, disjoint across ranks) and the real/synthetic mix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.train.data import (ImageFolderDataset, SyntheticSource, TrainingBatches, build_batches,
                                     folder_batch_indices, scan_image_folder)


def write_image(path, size=(40, 24), color=(255, 0, 0), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def test_scan_finds_jpg_png_webp_recursively_and_counts_unreadable(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "sub" / "b.JPG", fmt="JPEG")
    write_image(tmp_path / "sub" / "deeper" / "c.webp", fmt="WEBP")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    write_image(tmp_path / "tiny.png", size=(4, 4))  # below imageio's minimum side
    (tmp_path / "notes.txt").write_text("ignored")
    report = scan_image_folder(tmp_path)
    assert [p.name for p in report.paths] == ["a.png", "b.JPG", "c.webp"]
    assert sorted(p.name for p in report.skipped) == ["broken.png", "tiny.png"]


def test_empty_folder_and_unreadable_only_folder_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="no .jpg/.png/.webp files"):
        scan_image_folder(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "y.png").write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="none of the 2 image files could be read"):
        scan_image_folder(tmp_path)
    with pytest.raises(UserInputError, match="not a directory"):
        scan_image_folder(tmp_path / "missing")


def test_images_are_centre_cropped_and_resized_to_the_generator_resolution(tmp_path):
    image = np.zeros((24, 40, 3), dtype=np.uint8)
    image[:, 8:32] = 255  # the centred 24x24 square is white, the side bands black
    Image.fromarray(image).save(tmp_path / "wide.png")
    dataset = ImageFolderDataset(scan_image_folder(tmp_path), resolution=16)
    tensor = dataset[0]
    assert tensor.shape == (3, 16, 16)
    assert torch.allclose(tensor, torch.ones_like(tensor), atol=1e-2)  # only the white centre survives


def test_batch_order_is_a_pure_function_of_seed_and_step_and_ranks_are_disjoint():
    first = folder_batch_indices(10, 3, micro_step=5, seed=7)
    assert first == folder_batch_indices(10, 3, micro_step=5, seed=7)
    assert first != folder_batch_indices(10, 3, micro_step=5, seed=8)
    # one epoch of 2 ranks x batch 5 covers the 10 images exactly once
    rank0 = folder_batch_indices(10, 5, micro_step=0, seed=1, rank=0, world_size=2)
    rank1 = folder_batch_indices(10, 5, micro_step=0, seed=1, rank=1, world_size=2)
    assert sorted(rank0 + rank1) == list(range(10))
    # an epoch boundary inside a batch continues with the next epoch's permutation
    assert len(folder_batch_indices(10, 4, micro_step=2, seed=1)) == 4


class FlatGenerator(torch.nn.Module):
    """A stand-in G whose images encode the first latent component (to tell samples apart)."""

    z_dim, w_dim, num_ws, img_resolution = 4, 4, 2, 8

    def mapping(self, z, truncation_psi=1.0):
        return (z * truncation_psi).unsqueeze(1).repeat(1, self.num_ws, 1)

    def synthesis(self, ws, noise_mode="const"):
        return ws[:, 0, 0].tanh().view(-1, 1, 1, 1).expand(-1, 3, self.img_resolution, self.img_resolution)


def test_mix_ratio_fixes_the_number_of_synthetic_images_per_batch(tmp_path):
    for index in range(6):
        write_image(tmp_path / f"{index}.png", color=(index * 40, 0, 0))
    synthetic = SyntheticSource(FlatGenerator(), truncation=0.5, device=torch.device("cpu"))
    batches, report = build_batches(str(tmp_path), resolution=8, batch_size=4, seed=0, synthetic=synthetic,
                                    synthetic_ratio=0.25)
    assert (batches.num_real, batches.num_synthetic) == (3, 1) and len(report.paths) == 6
    batch = batches.batch(0, torch.device("cpu"))
    assert batch.shape == (4, 3, 8, 8)
    assert torch.equal(batch, batches.batch(0, torch.device("cpu")))  # reproducible (resume)
    assert not torch.equal(batch, batches.batch(1, torch.device("cpu")))
    stream = batches.iterate(1, torch.device("cpu"))
    assert torch.equal(next(stream), batches.batch(1, torch.device("cpu")))


def test_synthetic_only_batches_and_held_out_images_are_fixed():
    synthetic = SyntheticSource(FlatGenerator(), truncation=0.7, device=torch.device("cpu"))
    batches = TrainingBatches(3, seed=2, synthetic=synthetic)
    assert batches.num_synthetic == 3
    held = batches.held_out(2, torch.device("cpu"))
    assert held.shape == (2, 3, 8, 8) and torch.equal(held, batches.held_out(2, torch.device("cpu")))
    assert (held.abs() <= 1).all()


def test_folder_batches_through_dataloader_workers_match_the_direct_ones(tmp_path):
    for index in range(5):
        write_image(tmp_path / f"{index}.png", color=(0, index * 50, 0))
    direct, _ = build_batches(str(tmp_path), resolution=8, batch_size=2, seed=3, synthetic=None)
    workers, _ = build_batches(str(tmp_path), resolution=8, batch_size=2, seed=3, synthetic=None, num_workers=1)
    stream = workers.iterate(4, torch.device("cpu"))
    for micro_step in (4, 5, 6):
        assert torch.equal(next(stream), direct.batch(micro_step, torch.device("cpu")))


def test_sample_sheet_images_are_held_out_of_training_when_the_folder_is_large_enough(tmp_path):
    for index in range(8):
        write_image(tmp_path / f"{index}.png", color=(index * 30, 0, 0))
    batches, report = build_batches(str(tmp_path), resolution=8, batch_size=2, seed=0, synthetic=None, held_out=2)
    assert len(report.paths) == 8
    assert len(batches.folder) == 6 and len(batches.held_out_folder) == 2
    assert not set(batches.folder.paths) & set(batches.held_out_folder.paths)
    assert batches.held_out(2, torch.device("cpu")).shape == (2, 3, 8, 8)
    small, _ = build_batches(str(tmp_path), resolution=8, batch_size=2, seed=0, synthetic=None, held_out=4)
    assert len(small.folder) == 8 and small.held_out_folder is None  # too few images to spare 4


def test_an_image_corrupt_past_its_header_is_replaced_and_counted(tmp_path):
    write_image(tmp_path / "a.png", size=(32, 32), color=(0, 0, 255))
    write_image(tmp_path / "b.png", size=(32, 32), color=(0, 255, 0))
    (tmp_path / "a.png").write_bytes((tmp_path / "a.png").read_bytes()[:60])  # header intact, pixels cut
    dataset = ImageFolderDataset(scan_image_folder(tmp_path), resolution=8)
    assert len(dataset) == 2  # the header scan cannot tell
    first = dataset[0]
    assert dataset.decode_failures == 1
    assert torch.equal(first, dataset[1])  # the next readable image stands in
