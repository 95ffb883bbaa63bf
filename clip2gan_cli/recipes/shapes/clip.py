"""Train the shapes pack's tiny CLIP contrastively on (image, caption) pairs from the domain.

The model is an open_clip `CLIP` built from a custom config (ViT with 8-px patches on 32x32
images; a small text transformer over the pack's word vocabulary). Captions name only some
attributes ("a red circle"), so several images in a batch match one caption: the loss uses soft
targets (every image consistent with the caption is a positive) instead of the identity matrix.

Resumable: `<workdir>/clip_ckpt.pt` is written every 200 steps; running again continues, drawing
exactly the batches an uninterrupted run would (each step's RNG is seeded from (seed, step)).
Usage: python -m clip2gan_cli.recipes.shapes.clip --workdir work_shapes --steps 1200
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...fileutil import atomic_path, atomic_write_text
from ...packs.shapes import data
from ...tokenizer import VocabTokenizer
from ...train.checkpoints import sort_safetensors_header

MODEL_NAME = "clip2gan-shapes-vit-p4"
CONTEXT_LENGTH = 16
IMAGE_MEAN = (0.5, 0.5, 0.5)  # images in [-1, 1] map to [0, 1] pixels normalised like this
IMAGE_STD = (0.5, 0.5, 0.5)


def clip_model_config(vocab_size: int, context_length: int = CONTEXT_LENGTH) -> dict:
    """open_clip model config (the `model_cfg` JSON open_clip reads) for the tiny shapes CLIP."""
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": data.RESOLUTION, "patch_size": 8, "layers": 4, "width": 128,
                       "head_width": 32, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": 128,
                     "heads": 4, "layers": 3, "mlp_ratio": 2.0},
    }


def pack_clip_config(tokenizer: VocabTokenizer) -> dict:
    """The clip_config.json shipped in the pack: open_clip config + vocabulary + preprocessing."""
    return {
        "model_name": MODEL_NAME,
        "model_cfg": clip_model_config(tokenizer.vocab_size, tokenizer.context_length),
        "tokenizer": tokenizer.to_dict(),
        "image_size": data.RESOLUTION,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }


def build_clip(config: dict):
    """An open_clip CLIP with random weights from a `pack_clip_config` dict."""
    import open_clip

    return open_clip.CLIP(**config["model_cfg"])


def images_to_clip_input(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] normalised for the CLIP (here: [-1, 1])."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def caption_match_matrix(attributes: list[dict], captions: list[str]) -> torch.Tensor:
    """[N_images, N_captions] bool: image i shows everything caption j names."""
    tables = {"shape": list(data.SHAPES), "color": list(data.COLORS), "size": list(data.SIZES),
              "background": list(data.BACKGROUNDS)}
    keys = list(tables)
    value_to_slot = {value: (slot, index) for slot, key in enumerate(keys) for index, value in enumerate(tables[key])}
    image_codes = torch.tensor([[tables[k].index(a[k]) for k in keys] for a in attributes])
    caption_codes = torch.full((len(captions), len(keys)), -1)  # -1: the caption does not name it
    for j, text in enumerate(captions):
        for word in VocabTokenizer.split(text):
            if word in value_to_slot:
                slot, index = value_to_slot[word]
                caption_codes[j, slot] = index
    named = caption_codes[None, :, :] >= 0
    return ((image_codes[:, None, :] == caption_codes[None, :, :]) | ~named).all(-1)


def soft_contrastive_loss(image_features, text_features, logit_scale, match) -> torch.Tensor:
    """Symmetric InfoNCE with every consistent (image, caption) pair counted as a positive."""
    logits = logit_scale * image_features @ text_features.t()
    targets = match.float()
    loss_images = -(F.log_softmax(logits, dim=1) * targets / targets.sum(1, keepdim=True)).sum(1).mean()
    loss_texts = -(F.log_softmax(logits.t(), dim=1) * targets.t() / targets.t().sum(1, keepdim=True)).sum(1).mean()
    return (loss_images + loss_texts) / 2


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, n: int = 1000, seed: int = 10_000) -> dict:
    """Per-attribute accuracy of picking the best of all full captions for fresh images."""
    model.eval()
    combos = [(s, c, z, b) for s in data.SHAPES for c in data.COLORS for z in data.SIZES for b in data.BACKGROUNDS]
    prompts = [f"a {z} {c} {s} on a {b} background" for s, c, z, b in combos]
    text_features = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    images, attributes = data.sample(n, seed)
    image_features = F.normalize(model.encode_image(images_to_clip_input(images)), dim=-1)
    best = (image_features @ text_features.t()).argmax(1).tolist()
    result = {}
    for index, key in enumerate(("shape", "color", "size", "background")):
        result[key] = float(np.mean([combos[b][index] == a[key] for b, a in zip(best, attributes)]))
    result["joint"] = float(np.mean([combos[b] == (a["shape"], a["color"], a["size"], a["background"])
                                     for b, a in zip(best, attributes)]))
    model.train()
    return result


def export_clip(model, tokenizer: VocabTokenizer, out_dir: Path) -> None:
    """Write clip.safetensors (fp16) and clip_config.json into out_dir, atomically."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "clip.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model_name": MODEL_NAME})
    sort_safetensors_header(out_dir / "clip.safetensors")  # same weights, same bytes
    atomic_write_text(out_dir / "clip_config.json", json.dumps(pack_clip_config(tokenizer), indent=2) + "\n")


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of one training step: a resumed run draws exactly what an uninterrupted one does."""
    return (seed * 1_000_003 + step) % (1 << 31)


def train_step(model, optimizer, tokenizer: VocabTokenizer, step: int, steps: int, batch: int, lr: float,
               seed: int) -> torch.Tensor:
    """One contrastive step on a fresh batch drawn from (seed, step), warm-up then cosine learning rate."""
    rng = np.random.default_rng(step_seed(seed, step))
    torch.manual_seed(step_seed(seed, step))
    warm = min(1.0, (step + 1) / 100)
    progress = step / steps
    for group in optimizer.param_groups:
        group["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    images, attributes = data.sample(batch, seed=int(rng.integers(1 << 31)))
    captions = [data.caption(a, rng) for a in attributes]
    x = images_to_clip_input(images)
    x = x + 0.06 * torch.randn_like(x)  # robustness to GAN pixel noise
    image_features = F.normalize(model.encode_image(x), dim=-1)
    text_features = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    loss = soft_contrastive_loss(image_features, text_features, model.logit_scale.exp().clamp(max=100),
                                 caption_match_matrix(attributes, captions))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def train(workdir: Path, steps: int, batch: int, lr: float, seed: int, threads: int, save_every: int = 200) -> dict:
    """Train (or resume) for a step budget (cosine schedule over it); returns the final evaluation.

    Step budgets, not wall time: the same seed, thread count and torch build give the same weights on
    any machine, however loaded, and however often the run was interrupted.
    """
    torch.set_num_threads(threads)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = VocabTokenizer(data.vocabulary(), context_length=CONTEXT_LENGTH)
    config = pack_clip_config(tokenizer)
    torch.manual_seed(seed)
    model = build_clip(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    ckpt_path = workdir / "clip_ckpt.pt"
    state = {"step": 0, "seconds": 0.0, "history": []}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = json.loads(ckpt["state"])
        print(f"resumed at step {state['step']} of {steps} ({state['seconds'] / 60:.1f} min trained)", flush=True)

    def save() -> None:
        with atomic_path(ckpt_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "state": json.dumps(state)}, tmp)

    start = time.time() - state["seconds"]
    model.train()
    while state["step"] < steps:
        step = state["step"]
        loss = train_step(model, optimizer, tokenizer, step, steps, batch, lr, seed)
        state["step"] = step + 1
        state["seconds"] = time.time() - start
        if state["step"] % 50 == 0:
            print(f"step {state['step']}/{steps} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{state['seconds'] / 60:.1f} min", flush=True)
        if state["step"] % save_every == 0 and state["step"] < steps:
            accuracy = zero_shot_accuracy(model, tokenizer, n=500)
            state["history"].append({"step": state["step"], "minutes": state["seconds"] / 60, **accuracy})
            print("eval", json.dumps(accuracy), flush=True)
            save()
    accuracy = zero_shot_accuracy(model, tokenizer, n=1000)
    save()
    export_clip(model, tokenizer, workdir / "clip_export")
    (workdir / "clip_eval.json").write_text(json.dumps({"final": accuracy, **state}, indent=2))
    print("final", json.dumps(accuracy), flush=True)
    return accuracy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work_shapes"))
    parser.add_argument("--steps", type=int, default=1200, help="total training steps (resumes count)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args(argv)
    train(args.workdir, args.steps, args.batch, args.lr, args.seed, args.threads)


if __name__ == "__main__":
    main()
