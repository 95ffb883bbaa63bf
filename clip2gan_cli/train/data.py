"""Training images: a folder of real images, images sampled from the frozen G, or a mix.

Every batch is a pure function of (seed, rank, micro-step): the folder order comes from a seeded
permutation per epoch and synthetic latents from a generator seeded per micro-step. A resumed run
therefore sees exactly the batches the uninterrupted run would have seen, with no loader state to save.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import UserInputError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Distinct streams for the per-step generators (so data, noise and GP never share draws).
STREAM_FOLDER, STREAM_SYNTHETIC, STREAM_NOISE, STREAM_GP, STREAM_D_INIT = range(5)


def step_generator(seed: int, stream: int, step: int, rank: int = 0) -> "torch.Generator":
    """A CPU generator seeded from (seed, stream, step, rank): reproducible draws without saved state."""
    import torch

    # Large odd multipliers keep the combined seeds of different tuples apart.
    mixed = (seed * 1_000_003 + stream * 7_919 + rank * 104_729 + step * 15_485_863) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@dataclass
class ScanReport:
    """What a folder scan found: readable image paths and the files skipped as unreadable."""

    paths: list[Path]
    skipped: list[Path] = field(default_factory=list)


def scan_image_folder(root: str | os.PathLike) -> ScanReport:
    """Find readable images (jpg/png/webp, recursive, sorted) under `root`.

    Each file's header is read with PIL (not its pixels, which would take hours for a large set);
    files that fail, or fall outside imageio's size limits, are skipped and counted. A file whose
    pixels turn out corrupt later is replaced at load time (ImageFolderDataset). An empty folder or
    one with no readable image raises UserInputError saying how many files were skipped.
    """
    from PIL import Image

    from ..imageio import MAX_PIXELS, MIN_SIDE

    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"`data` {root}: not a directory", hint="give a folder of images or 'synthetic'")
    candidates = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not candidates:
        raise UserInputError(f"`data` {root}: no .jpg/.png/.webp files found (searched recursively)")
    readable, skipped = [], []
    for path in candidates:
        try:
            with Image.open(path) as image:  # header only: a 70k-image folder scans in seconds
                width, height = image.size
            if min(width, height) < MIN_SIDE or width * height > MAX_PIXELS:
                raise ValueError("outside imageio's size limits")
            readable.append(path)
        except Exception:  # PIL raises many types for corrupt files; any of them means "skip"
            skipped.append(path)
    if not readable:
        raise UserInputError(f"`data` {root}: none of the {len(skipped)} image files could be read "
                             f"({len(skipped)} skipped)")
    return ScanReport(readable, skipped)


class ImageFolderDataset:
    """Map-style dataset over a scanned folder: imageio's safe reader, centre crop (or MTCNN face
    alignment), resize to G's resolution, [3, R, R] in [-1, 1]. A file that fails to decode later is
    replaced by the next readable one (and counted in `decode_failures`) so one bad file never
    stops a long run."""

    def __init__(self, report: ScanReport, resolution: int, align: bool = False):
        self.paths = report.paths
        self.skipped = len(report.skipped)
        self.resolution = resolution
        self.align = align
        self.decode_failures = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> "torch.Tensor":
        from ..imageio import load_image_tensor

        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return load_image_tensor(path, self.resolution, align=self.align)[0]
            except Exception:  # truncated/corrupt past the header, or no face when aligning
                self.decode_failures += 1
        raise UserInputError("no image in the data folder could be decoded")


def folder_batch_indices(dataset_size: int, batch_size: int, micro_step: int, seed: int,
                         rank: int = 0, world_size: int = 1) -> list[int]:
    """Indices of this rank's batch at `micro_step`: a seeded permutation per epoch, split by rank.

    The global batch (batch_size * world_size) is a contiguous window of the epoch stream, so
    ranks see disjoint images (the DistributedSampler idea) and any step can be recomputed.
    """
    global_batch = batch_size * world_size
    start = micro_step * global_batch + rank * batch_size
    indices = []
    cached_epoch, permutation = -1, None
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, dataset_size)
        if epoch != cached_epoch:
            permutation = _epoch_permutation(dataset_size, seed, epoch)
            cached_epoch = epoch
        indices.append(int(permutation[offset]))
    return indices


def _epoch_permutation(dataset_size: int, seed: int, epoch: int) -> "torch.Tensor":
    import torch

    return torch.randperm(dataset_size, generator=step_generator(seed, STREAM_FOLDER, epoch))


class SyntheticSource:
    """Images drawn from the frozen generator on the fly (z ~ N(0, I), truncation psi)."""

    def __init__(self, generator: "torch.nn.Module", truncation: float, device: "torch.device"):
        self.generator = generator
        self.truncation = truncation
        self.device = device

    @property
    def resolution(self) -> int:
        return int(self.generator.img_resolution)

    def sample(self, count: int, torch_generator: "torch.Generator") -> "torch.Tensor":
        """`count` images in [-1, 1]; z drawn on the CPU from `torch_generator` (device independent)."""
        import torch

        z = torch.randn(count, self.generator.z_dim, generator=torch_generator).to(self.device)
        with torch.no_grad():
            ws = self.generator.mapping(z, truncation_psi=self.truncation)
            images = self.generator.synthesis(ws, noise_mode="const")
        return images.float().clamp(-1, 1)


class TrainingBatches:
    """The batch stream: folder images, synthetic images, or a per-batch mix with a fixed ratio."""

    def __init__(self, batch_size: int, seed: int, *, folder: ImageFolderDataset | None = None,
                 synthetic: SyntheticSource | None = None, synthetic_ratio: float = 0.0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        if folder is None and synthetic is None:
            raise ValueError("TrainingBatches needs a folder, a synthetic source or both")
        self.batch_size = batch_size
        self.seed = seed
        self.folder = folder
        self.synthetic = synthetic
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.held_out_folder: ImageFolderDataset | None = None  # set by build_batches
        if folder is None:
            self.num_synthetic = batch_size
        elif synthetic is None:
            self.num_synthetic = 0
        else:
            # Fixed count per batch (not a coin flip per image) so every batch has the same mix.
            self.num_synthetic = int(round(synthetic_ratio * batch_size))
        self.num_real = batch_size - self.num_synthetic

    def batch(self, micro_step: int, device: "torch.device") -> "torch.Tensor":
        """The images of this rank at `micro_step`, [batch_size, 3, R, R] in [-1, 1] on `device`."""
        import torch

        parts = []
        if self.num_real:
            indices = folder_batch_indices(len(self.folder), self.num_real, micro_step, self.seed,
                                           self.rank, self.world_size)
            parts.append(torch.stack([self.folder[i] for i in indices]).to(device))
        if self.num_synthetic:
            generator = step_generator(self.seed, STREAM_SYNTHETIC, micro_step, self.rank)
            parts.append(self.synthetic.sample(self.num_synthetic, generator))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def iterate(self, start_micro_step: int, device: "torch.device") -> Iterator["torch.Tensor"]:
        """Batches from `start_micro_step` on; folder decoding runs in DataLoader workers when asked."""
        if self.num_real and self.num_workers > 0:
            yield from self._iterate_with_workers(start_micro_step, device)
            return
        micro_step = start_micro_step
        while True:
            yield self.batch(micro_step, device)
            micro_step += 1

    def _iterate_with_workers(self, start_micro_step: int, device: "torch.device") -> Iterator["torch.Tensor"]:
        import torch
        from torch.utils.data import DataLoader

        sampler = _StepBatchSampler(self, start_micro_step)
        loader = DataLoader(self.folder, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=True)
        micro_step = start_micro_step
        for real in loader:
            real = real.to(device, non_blocking=True)
            if self.num_synthetic:
                generator = step_generator(self.seed, STREAM_SYNTHETIC, micro_step, self.rank)
                real = torch.cat([real, self.synthetic.sample(self.num_synthetic, generator)])
            yield real
            micro_step += 1

    def held_out(self, count: int, device: "torch.device") -> "torch.Tensor | None":
        """Fixed images for the sample sheets, never trained on: the folder's held-out files when it
        has them (see `build_batches`), else G samples from a seed no training step uses."""
        import torch

        if count <= 0:  # num_sample_images = 0: sheets show the prompts only
            return None
        if self.held_out_folder is not None and len(self.held_out_folder):
            count = min(count, len(self.held_out_folder))
            return torch.stack([self.held_out_folder[i] for i in range(count)]).to(device)
        if self.synthetic is not None:
            generator = step_generator(self.seed, STREAM_SYNTHETIC, -1)  # step -1: never a training step
            return self.synthetic.sample(count, generator)
        count = min(count, len(self.folder))  # a folder too small to spare images: show training images
        stride = max(1, len(self.folder) // count)
        return torch.stack([self.folder[i * stride] for i in range(count)]).to(device)


    def bank_images(self, count: int, chunk: int, device: "torch.device") -> Iterator["torch.Tensor"]:
        """`count` fixed images (fewer for a smaller folder) in chunks, for the retrieval prior's bank: the
        training folder at an even stride when there is one, else G samples from a seed no step uses."""
        import torch

        if self.folder is not None and len(self.folder):
            count = min(count, len(self.folder))
            indices = [i * len(self.folder) // count for i in range(count)]
            for start in range(0, count, chunk):
                yield torch.stack([self.folder[i] for i in indices[start:start + chunk]]).to(device)
            return
        generator = step_generator(self.seed, STREAM_SYNTHETIC, -2)  # step -2: neither training nor held out
        for start in range(0, count, chunk):
            yield self.synthetic.sample(min(chunk, count - start), generator)


class _StepBatchSampler:
    """Batch sampler yielding `folder_batch_indices` from a start micro-step on (endless)."""

    def __init__(self, batches: TrainingBatches, start_micro_step: int):
        self.batches = batches
        self.start = start_micro_step

    def __iter__(self):
        micro_step = self.start
        while True:
            b = self.batches
            yield folder_batch_indices(len(b.folder), b.num_real, micro_step, b.seed, b.rank, b.world_size)
            micro_step += 1


def build_batches(data: str, *, resolution: int, batch_size: int, seed: int, synthetic: SyntheticSource | None,
                  synthetic_ratio: float = 0.0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                  align: bool = False, held_out: int = 0) -> tuple[TrainingBatches, ScanReport | None]:
    """Turn `--data DIR|synthetic` into a TrainingBatches (and the folder scan report, if any).

    With a folder of at least 4x `held_out` images, `held_out` evenly spaced files are set aside for
    the sample sheets and never trained on.
    """
    if data == "synthetic":
        return TrainingBatches(batch_size, seed, synthetic=synthetic, rank=rank, world_size=world_size), None
    report = scan_image_folder(data)
    train_paths, spare_paths = report.paths, []
    if held_out and len(report.paths) >= 4 * held_out:
        stride = len(report.paths) // held_out
        spare = set(range(0, stride * held_out, stride))
        spare_paths = [p for i, p in enumerate(report.paths) if i in spare]
        train_paths = [p for i, p in enumerate(report.paths) if i not in spare]
    folder = ImageFolderDataset(ScanReport(train_paths, report.skipped), resolution, align)
    batches = TrainingBatches(batch_size, seed, folder=folder,
                              synthetic=synthetic if synthetic_ratio > 0 else None,
                              synthetic_ratio=synthetic_ratio, rank=rank, world_size=world_size,
                              num_workers=num_workers)
    if spare_paths:
        batches.held_out_folder = ImageFolderDataset(ScanReport(spare_paths), resolution, align)
    return batches, report
