"""What a run tells the user: metrics.jsonl (+ TensorBoard), sample sheets, the progress bar, stderr lines."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import OutputError
from ..fileutil import atomic_write_text


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class MetricsWriter:
    """metrics.jsonl (always) and TensorBoard events (when tensorboard is installed), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tensorboard = None

    def write(self, step: int, losses: dict[str, float], steps_per_second: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"loss/{k}": v for k, v in losses.items()}, "steps_per_s": steps_per_second}
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error.strerror or error}") from error
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


class RunningMeans:
    """Per-name sums of the values logged since the last report; `means()` averages and restarts."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        means = {name: total / self.count for name, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after the checkpoint being resumed (they will be logged again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


@torch.no_grad()
def write_sample_sheet(path: Path, held_out: torch.Tensor | None, prompts: list[str], clip: nn.Module,
                       mapper: nn.Module, generator: nn.Module) -> Path | None:
    """PNG grid: row 1 held-out images, row 2 their reconstructions, then one image per prompt (the prompt
    row alone without held-out images; nothing without either)."""
    from ..imageio import make_grid, save_png

    tiles = []
    if held_out is not None and held_out.shape[0]:
        reconstructed = generator.synthesis(mapper(clip.encode_image(held_out)), noise_mode="const").float()
        tiles = [held_out.float(), reconstructed]
    elif not prompts:
        return None
    columns = held_out.shape[0] if tiles else len(prompts)
    if prompts:
        generated = generator.synthesis(mapper(clip.encode_text(prompts)), noise_mode="const").float()
        padding = (-generated.shape[0]) % columns
        if padding:  # fill the last row with mid-grey
            generated = torch.cat([generated, generated.new_zeros(padding, *generated.shape[1:])])
        tiles.append(generated)
    grid = make_grid(torch.cat(tiles).clamp(-1, 1).cpu(), columns=columns)
    return save_png(path, grid, metadata={"clip2gan.prompts": list(prompts)})


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, values) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar on stderr, or an object with the same three methods that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
