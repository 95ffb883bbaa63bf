"""An independent attribute checker for the shapes domain: a small CNN trained on `sample()`.

It never sees the pack's CLIP or generator, so its verdicts on generated images are an outside
measurement (used by the GAN training monitor and by bench/shapes_quality.py). Heads: shape,
colour, size, background (classes) and the shape centre (x, y regression, in pixels).

    checker = load_or_train_checker(Path("work_shapes/checker.pt"))
    predictions = checker.predict(images_minus1_to_1)   # dict of int/float tensors
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...fileutil import atomic_path
from ...packs.shapes import data

HEADS = {"shape": len(data.SHAPES), "color": len(data.COLORS), "size": len(data.SIZES),
         "background": len(data.BACKGROUNDS)}


class AttributeChecker(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px) and one linear head per attribute plus (x, y)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({key: nn.Linear(128, classes) for key, classes in HEADS.items()})
        self.position = nn.Linear(128, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [N, 3, 32, 32] in [-1, 1] -> logits per attribute and 'position' [N, 2] in pixels."""
        hidden = self.features(images)
        out = {key: head(hidden) for key, head in self.heads.items()}
        out["position"] = self.position(hidden) * 4.0 + data.RESOLUTION / 2.0
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 512) -> dict[str, torch.Tensor]:
        """Class indices per attribute and positions, for images in [-1, 1] (clamped first)."""
        self.eval()
        parts = []
        for start in range(0, images.shape[0], batch):
            logits = self(images[start:start + batch].float().clamp(-1, 1))
            parts.append({k: (v.argmax(1) if k in HEADS else v) for k, v in logits.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (the generator's range)."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_checker(steps: int = 1500, batch: int = 128, seed: int = 1, log=print) -> AttributeChecker:
    """Train on fresh samples with pixel noise and slight blur (so GAN artefacts do not fool it)."""
    torch.manual_seed(seed)
    model = AttributeChecker()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    start = time.time()
    for step in range(steps):
        images, attributes = data.sample(batch, seed=int(rng.integers(1 << 31)))
        x = to_unit_range(images)
        if step % 2 == 0:  # half the batches slightly blurred
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1) * 0.5 + x * 0.5
        x = x + 0.08 * torch.randn_like(x) * torch.rand(x.shape[0], 1, 1, 1)
        targets = data.attribute_indices(attributes)
        out = model(x)
        loss = sum(F.cross_entropy(out[k], torch.from_numpy(targets[k])) for k in HEADS)
        position = torch.tensor([[a["x"], a["y"]] for a in attributes], dtype=torch.float32)
        loss = loss + 0.1 * F.smooth_l1_loss(out["position"], position)
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * (1 - step / steps) + 1e-5
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            log(f"checker step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.eval()
    return model


def checker_accuracy(model: AttributeChecker, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Accuracy per attribute on fresh real samples, and mean position error in pixels."""
    images, attributes = data.sample(n, seed)
    predictions = model.predict(to_unit_range(images))
    targets = data.attribute_indices(attributes)
    result = {k: float((predictions[k].numpy() == targets[k]).mean()) for k in HEADS}
    position = np.array([[a["x"], a["y"]] for a in attributes])
    result["position_error_px"] = float(np.abs(predictions["position"].numpy() - position).mean())
    return result


def load_or_train_checker(path: Path, steps: int = 1500, log=print) -> AttributeChecker:
    """Load a trained checker from `path`, or train one and save it there."""
    path = Path(path)
    model = AttributeChecker()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model
    model = train_checker(steps=steps, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model


def summarize(predictions: dict[str, torch.Tensor], wanted: list[dict]) -> dict[str, float]:
    """Fraction of images whose predicted attributes equal the wanted ones (keys present in `wanted`)."""
    result = {}
    for key in HEADS:
        if key in wanted[0]:
            names = {"shape": data.SHAPES, "color": list(data.COLORS), "size": list(data.SIZES),
                     "background": list(data.BACKGROUNDS)}[key]
            target = torch.tensor([list(names).index(w[key]) for w in wanted])
            result[key] = float((predictions[key] == target).float().mean())
    return result


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train (or load) the shapes attribute checker.")
    parser.add_argument("path", type=Path, nargs="?", default=Path("work_shapes/checker.pt"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checker = load_or_train_checker(args.path, steps=args.steps, log=lambda m: print(m, flush=True))
    print(checker_accuracy(checker), flush=True)


if __name__ == "__main__":
    main()
