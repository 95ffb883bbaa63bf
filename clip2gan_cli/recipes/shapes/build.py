"""Rebuild the builtin `shapes` pack from a seed, stage by stage, resuming where it stopped.

Stages (each resumable; finished stages are skipped on the next run):
  1. clip      tiny open_clip CLIP, contrastive on (image, caption) pairs   clip.py
  2. checker   independent attribute CNN (monitoring and bench only)        checker.py
  3. gan       StyleGAN2 G + D: decoder, mapping code, adversarial (D only)  gan.py
  4. export    generator/discriminator/CLIP into the pack directory
  5. mapper    `clip2gan train --config mapper.toml --pack shapes --data <work>/dataset` (the user code
               path, on 16,384 rendered domain images; `--mapper-data synthetic` uses G(z) samples
               instead), then CLIP's text feature shift, and mapper.safetensors into the pack directory
  6. sharpen   G's mapping network against D, from the pack's generator/discriminator files, with
               the synthesis network frozen (so the mapper of stage 5 stays valid) and a trust-region
               anchor; rewrites generator.safetensors and discriminator.safetensors
Budgets are steps, and every step's random draws are seeded from (seed, step): the same seed, thread
count and torch build give the same pack on one machine, however loaded, however often interrupted
(another machine's CPU kernels may round differently: docs/shapes_pack.md).
Each stage's wall time is added to `build_times.json` beside the weights (and to the work
directory's `build_state.json`, which is what resuming reads).

The perceptual term: LPIPS's pretrained AlexNet cannot be downloaded offline, so the mapper is
trained with `lpips_backbone=random` (a seeded random AlexNet trunk: on flat-colour 32 px images
its features still compare local edges and colours, which is what a perceptual term adds to L2).

Usage: python -m clip2gan_cli.recipes.shapes.build [--workdir work_shapes] [--pack-dir clip2gan_cli/packs/shapes]
       [--clip-steps 1200] [--gan-decoder-steps 5500] [--gan-adversarial-steps 1000] [--mapper-steps 4100]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ...fileutil import atomic_path, atomic_write_text
from ...mapper import load_mapper
from ...packs.shapes import PACK_DIR, data
from ...pipeline import parse_layers
from ...train.checkpoints import checkpoint_paths, save_mapper_reproducibly
from . import gan

STAGES = ("clip", "checker", "gan", "export", "mapper", "sharpen")
MAPPER_CONFIG = Path(__file__).with_name("mapper.toml")
PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding clip2gan_cli (for the train subprocess)
# build flag -> the mapper.toml key it overrides when given
MAPPER_FLAGS = {"mapper_batch": "batch_size", "mapper_lr": "lr", "mapper_hidden": "mapper_hidden_dim",
                "mapper_lambda_adv": "lambda_adv", "mapper_div_std": "div_std", "mapper_lambda_div": "lambda_div",
                "mapper_max_grad_norm": "max_grad_norm", "mapper_lr_schedule": "lr_schedule"}


class BuildState:
    """Which stages are done and how long each took (JSON in the work directory)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"stages": {}}

    def done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def record(self, stage: str, seconds: float, done: bool, **extra) -> None:
        entry = self.data["stages"].setdefault(stage, {"seconds": 0.0})
        entry["seconds"] = round(entry.get("seconds", 0.0) + seconds, 1)
        entry["done"] = done
        entry.update(extra)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    def times(self) -> dict:
        return {stage: entry.get("seconds", 0.0) for stage, entry in self.data["stages"].items()}


def stage_clip(args, log) -> dict:
    from .clip import train

    return {"zero_shot": train(args.workdir, args.clip_steps, batch=128, lr=1e-3, seed=args.seed, threads=args.threads)}


def stage_checker(args, log) -> dict:
    from .checker import checker_accuracy, load_or_train_checker

    checker = load_or_train_checker(args.workdir / "checker.pt", steps=args.checker_steps, log=log)
    return {"real_accuracy": checker_accuracy(checker, n=1000)}


def gan_trainer(args, log, workdir: Path | None = None, recipe=None):
    """A GAN trainer of this build, resumed from `workdir` (default: the build's, with the gan stage's
    recipe: the gan and export stages; the sharpen stage passes its own)."""
    import torch

    torch.set_num_threads(args.threads)
    recipe = recipe or gan.GanRecipe(adversarial_trains=args.gan_adversarial_trains)
    return gan.ShapesGanTrainer(workdir or args.workdir, recipe, seed=args.seed, log=log)


def readable_by_all(*paths: Path) -> None:
    """Package data: readable by every user (atomic temp files are 0600)."""
    for path in paths:
        os.chmod(path, 0o644)


def stage_gan(args, log) -> dict:
    trainer = gan_trainer(args, log)
    steps = (args.gan_decoder_steps, args.gan_mapping_steps, args.gan_adversarial_steps)
    for gan_stage, budget in zip(gan.STAGES, steps):
        trainer.run_stage(gan_stage, budget)
    return {"progress": trainer.progress}


def stage_export(args, log) -> dict:
    trainer = gan_trainer(args, log)
    args.pack_dir.mkdir(parents=True, exist_ok=True)
    written = list(trainer.export(args.pack_dir))
    for name in ("clip.safetensors", "clip_config.json"):
        source = args.workdir / "clip_export" / name
        with atomic_path(args.pack_dir / name) as tmp:
            shutil.copyfile(source, tmp)
        written.append(args.pack_dir / name)
    readable_by_all(*written)
    return {"files": [str(p) for p in written]}


def stage_sharpen(args, log) -> dict:
    """G's mapping network trained against D (synthesis frozen, anchored to where it started), from the
    pack's generator and discriminator files; the EMA generator and D are written back to the pack.

    Only G(z) changes: the text and edit paths use the synthesis network, which stays bit for bit.
    """
    folder = args.workdir / "sharpen"
    folder.mkdir(parents=True, exist_ok=True)
    if (args.workdir / "checker.pt").exists() and not (folder / "checker.pt").exists():
        shutil.copyfile(args.workdir / "checker.pt", folder / "checker.pt")  # its evaluations use the checker
    recipe = gan.GanRecipe(adversarial_trains="mapping", mapping_anchor_weight=args.gan_sharpen_anchor)
    trainer = gan_trainer(args, log, workdir=folder, recipe=recipe)
    if not trainer.path.exists():  # a fresh stage: start from what the earlier stages wrote
        trainer.load_pack_files(args.pack_dir)
        trainer.evaluate("sharpen_start")  # the G(z) quality this stage starts from, in gan_log.jsonl
    trainer.run_stage("adversarial", args.gan_sharpen_steps, eval_every=250)
    written = list(trainer.export(args.pack_dir))
    readable_by_all(*written)
    return {"files": [str(p) for p in written], "progress": trainer.progress}


def write_dataset(folder: Path, n: int, seed: int, log) -> Path:
    """PNG files of `data.sample(n, seed)` (the mapper's training images); kept if already complete."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) >= n:
        return folder
    log(f"writing {n} dataset images to {folder}")
    images, _ = data.sample(n, seed=seed)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return folder


def stage_mapper(args, log) -> dict:
    run_dir = args.workdir / "mapper_run"
    if args.mapper_data == "dataset":
        # Real domain images: every attribute combination, exactly; G(z) samples include the blends
        # its mapping network makes between neighbouring attribute codes.
        training_data = str(write_dataset(args.workdir / "dataset", args.dataset_size, args.seed + 2024, log))
    else:
        training_data = "synthetic"
    if not mapper_run_finished(run_dir, args.mapper_steps):  # a finished run is not retrained; what follows runs
        command = mapper_train_command(args, run_dir, training_data)
        log("running: " + " ".join(command))
        pythonpath = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), CLIP2GAN_OFFLINE="1", PYTHONPATH=pythonpath)
        subprocess.run(command, check=True, env=env)
    mapper = load_mapper(run_dir / "mapper.safetensors")
    if args.mapper_text_shift_samples > 0:
        # CLIP's modality gap, measured on domain images and captions drawn like the CLIP's training
        # pairs: generate moves text features by it into the image-feature region the mapper learnt.
        image_features, text_features = paired_clip_features(args.pack_dir / "clip_config.json",
                                                             args.mapper_text_shift_samples, args.seed + 4096)
        mapper.set_text_feature_shift(image_features, text_features)
        log(f"text feature shift: norm {mapper.text_feature_shift.norm():.4f} "
            f"({args.mapper_text_shift_samples} captioned images)")
        mapper.set_image_feature_bank(image_features)  # the same images: the retrieval prior's bank
    save_with_usage_defaults(mapper, args)
    return {"run_dir": str(run_dir)}


def mapper_train_command(args, run_dir: Path, training_data: str) -> list[str]:
    """`clip2gan train` with mapper.toml, the models just exported and the --mapper-* flags given (or --resume)."""
    command = [sys.executable, "-m", "clip2gan_cli", "train"]
    if (run_dir / "config.toml").exists() or any(run_dir.glob("checkpoint*")):
        return command + ["--resume", str(run_dir), "--steps", str(args.mapper_steps)]
    # The models just exported: the builtin pack itself, or explicit files when --pack-dir is elsewhere.
    models = (["--pack", "shapes"] if args.pack_dir.resolve() == PACK_DIR.resolve() else
              ["--generator", str(args.pack_dir / "generator.safetensors"),
               "--clip", str(args.pack_dir / "clip_config.json")])
    overrides = [["--set", f"{key}={getattr(args, flag)}"] for flag, key in MAPPER_FLAGS.items()
                 if getattr(args, flag) is not None]
    return command + ["--config", str(MAPPER_CONFIG), *models, "--data", training_data, "--out", str(run_dir),
                      "--seed", str(args.seed), *sum(overrides, []), "--steps", str(args.mapper_steps)]


def store_image_feature_bank(mapper, args) -> None:
    """The retrieval prior's bank: CLIP image features of the images that measure the text shift."""
    image_features, _ = paired_clip_features(args.pack_dir / "clip_config.json", args.mapper_text_shift_samples,
                                             args.seed + 4096)
    mapper.set_image_feature_bank(image_features)


def save_with_usage_defaults(mapper, args) -> None:
    """Store how to use this mapper in its file (generate's noise strength, edit's defaults and the
    contrast sets of --neutral auto) and write it to the pack; bench/shapes_quality.py measures each
    form, docs/shapes_pack.md has the numbers."""
    mapper.config = dataclasses.replace(
        mapper.config, generation_noise_strength=args.mapper_generation_noise,
        generation_prior=args.mapper_generation_prior, retrieval_temperature=args.mapper_retrieval_temperature,
        edit_direction=args.mapper_edit_direction, edit_layers=parse_layers(args.mapper_edit_layers),
        edit_beta=args.mapper_edit_beta, edit_neutral=None if args.mapper_edit_neutral == "none" else "auto",
        edit_contrast_sets=data.contrast_sets())
    path = save_mapper_reproducibly(mapper, args.pack_dir / "mapper.safetensors", {"clip2gan.source.pack": "shapes"})
    readable_by_all(path)  # same weights, same bytes


def mapper_run_finished(run_dir: Path, steps: int) -> bool:
    """True when the mapper run wrote its final checkpoint (step == steps) and mapper.safetensors."""
    done = checkpoint_paths(run_dir)  # [] when there is no checkpoints/ folder
    return bool(done) and done[-1][0] >= steps and (run_dir / "mapper.safetensors").is_file()


def paired_clip_features(clip_config: Path, n: int, seed: int):
    """CLIP image features of `data.sample(n, seed)` and text features of one caption per image."""
    import numpy as np
    import torch

    from ...clip import load_clip_from_config_file

    clip = load_clip_from_config_file(clip_config, device="cpu")
    images, attributes = data.sample(n, seed=seed)
    rng = np.random.default_rng(seed)
    captions = [data.caption(attrs, rng) for attrs in attributes]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        image_features = torch.cat([clip.encode_image(pixels[i:i + 256]) for i in range(0, n, 256)])
        text_features = torch.cat([clip.encode_text(captions[i:i + 256]) for i in range(0, n, 256)])
    return image_features, text_features


RUNNERS = {"clip": stage_clip, "checker": stage_checker, "gan": stage_gan, "export": stage_export,
           "mapper": stage_mapper, "sharpen": stage_sharpen}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clip2gan_cli.recipes.shapes.build",
                                     description="Rebuild the builtin shapes pack (resumable, stage by stage).")
    parser.add_argument("--workdir", type=Path, default=Path("work_shapes"))
    parser.add_argument("--pack-dir", type=Path, default=PACK_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clip-steps", type=int, default=1200)
    parser.add_argument("--checker-steps", type=int, default=300)
    parser.add_argument("--gan-decoder-steps", type=int, default=5500)
    parser.add_argument("--gan-mapping-steps", type=int, default=13000)
    parser.add_argument("--gan-adversarial-steps", type=int, default=1000)
    # The discriminator alone by default: training G here as well made the pack worse (docs/shapes_pack.md).
    parser.add_argument("--gan-adversarial-trains", choices=gan.ADVERSARIAL_TRAINS, default="discriminator",
                        help="what the adversarial stage trains (mapping: synthesis frozen; synthesis: mapping "
                             "frozen; discriminator: G frozen)")
    parser.add_argument("--gan-sharpen-steps", type=int, default=1000)
    parser.add_argument("--gan-sharpen-anchor", type=float, default=10.0,
                        help="weight of the sharpen stage's anchor (MSE to the mapping network it started from)")
    parser.add_argument("--mapper-steps", type=int, default=4100)  # the cosine schedule ends there
    parser.add_argument("--mapper-data", choices=["dataset", "synthetic"], default="dataset",
                        help="train the mapper on rendered domain images or on G(z) samples")
    parser.add_argument("--dataset-size", type=int, default=16384)
    from_toml = "(default: mapper.toml's %s)"
    parser.add_argument("--mapper-batch", type=int, help=from_toml % "batch_size")
    parser.add_argument("--mapper-lr", type=float, help=from_toml % "lr")
    parser.add_argument("--mapper-lambda-adv", type=float, help=from_toml % "lambda_adv")
    parser.add_argument("--mapper-div-std", type=float, help=from_toml % "div_std")
    parser.add_argument("--mapper-lambda-div", type=float, help=from_toml % "lambda_div")
    parser.add_argument("--mapper-max-grad-norm", type=float,
                        help="clip the mapper's gradient norm (0 = off) " + from_toml % "max_grad_norm")
    parser.add_argument("--mapper-lr-schedule", choices=["constant", "cosine"], help=from_toml % "lr_schedule")
    parser.add_argument("--mapper-hidden", type=int, help=from_toml % "mapper_hidden_dim")
    parser.add_argument("--mapper-generation-noise", type=float, default=0.1)
    parser.add_argument("--mapper-text-shift-samples", type=int, default=4096,
                        help="captioned images that measure the text feature shift and whose image features "
                             "are the retrieval prior's bank (0 = neither)")
    # retrieval: a prompt naming no background gets a real image's, not the grey blend of black and white
    parser.add_argument("--mapper-generation-prior", choices=["text", "retrieval"], default="retrieval")
    parser.add_argument("--mapper-retrieval-temperature", type=float, default=0.01)
    parser.add_argument("--mapper-edit-direction", choices=["text", "image"], default="image")
    parser.add_argument("--mapper-edit-layers", default="4:", help="W+ rows edits move by default (START:STOP)")
    parser.add_argument("--mapper-edit-beta", type=float, default=1.25)
    # auto: `edit red.png "blue"` edits along "blue" - "red" (the bare word lands far from every image feature)
    parser.add_argument("--mapper-edit-neutral", choices=["auto", "none"], default="auto")
    parser.add_argument("--restamp-mapper", action="store_true",
                        help="only store the usage defaults above and the image feature bank in the pack's "
                             "existing mapper.safetensors (weights and text shift untouched) and exit")
    parser.add_argument("--only", choices=STAGES, action="append", help="run only these stages (repeatable)")
    parser.add_argument("--redo", choices=STAGES, action="append", default=[], help="run these even if done")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.restamp_mapper:
        mapper = load_mapper(args.pack_dir / "mapper.safetensors")
        if args.mapper_text_shift_samples > 0:
            store_image_feature_bank(mapper, args)
        save_with_usage_defaults(mapper, args)
        print(f"stored the usage defaults and the image feature bank in {args.pack_dir / 'mapper.safetensors'}")
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    state = BuildState(args.workdir / "build_state.json")
    build_start = time.time()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{(time.time() - build_start) / 60:5.1f} min] {message}", flush=True)

    for index, stage in enumerate(STAGES, 1):
        if args.only and stage not in args.only:
            continue
        if state.done(stage) and stage not in args.redo:
            log(f"[{index}/{len(STAGES)}] {stage}: done earlier ({state.times().get(stage, 0) / 60:.1f} min), skipped")
            continue
        log(f"[{index}/{len(STAGES)}] {stage}: starting")
        start = time.time()
        try:
            extra = RUNNERS[stage](args, log)
        except BaseException:
            state.record(stage, time.time() - start, done=False)  # the time spent still counts when resumed
            raise
        state.record(stage, time.time() - start, done=True, **{k: v for k, v in extra.items() if k != "progress"})
        log(f"[{index}/{len(STAGES)}] {stage}: finished in {(time.time() - start) / 60:.1f} min")
    times_path = args.pack_dir / "build_times.json"
    # Stages run elsewhere (an earlier work directory, then `--only sharpen` here) keep their recorded times.
    earlier = json.loads(times_path.read_text()) if times_path.exists() else {}
    stage_seconds = {**earlier.get("stage_seconds", {}), **state.times()}
    times = {**earlier, "stage_seconds": stage_seconds, "total_seconds": round(sum(stage_seconds.values()), 1),
             "seed": args.seed, "threads": args.threads}
    atomic_write_text(times_path, json.dumps(times, indent=2) + "\n")
    readable_by_all(times_path)
    log(f"pack in {args.pack_dir}: {json.dumps(times['stage_seconds'])}")


if __name__ == "__main__":
    main()
