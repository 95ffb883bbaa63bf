"""Training speed: steps/s of `clip2gan train` for a small config, with each loss switched on in turn.

    .venv/bin/python bench/train.py [--steps 10] [--resolution 32] [--batch-size 4] [--device cpu]
    .venv/bin/python bench/train.py --compare-noise [--pack shapes] [--steps 300]
    .venv/bin/python bench/train.py --resolution 1024 [--checkpointing on|off|both] [--device cuda]

Full size (`--mode memory`, the default at --resolution >= 512): a config-f generator and
discriminator at that resolution, ViT-B-16 CLIP, random weights, the default losses (LPIPS on its
random-trunk backbone, no identity net), one training step at batch 1 and at batch 2, each in a fresh
process, with and without activation checkpointing of the synthesis and discriminator blocks
(the config's `checkpoint_blocks`, which the trainer applies to G and D). It prints seconds per step and
peak memory (RSS on the CPU, torch.cuda.max_memory_allocated on CUDA) per batch size and their
difference: the memory each additional sample costs.

`--mode cost`: the time checkpointing adds to the networks' part of a mapper step, side by side in
one process (alternating off/on, so machine load hits both alike): config-f synthesis of 2*batch
images (L_div doubles the batch) and D on batch images, forward and backward to the latents.

`--compare-noise` trains the mapper once with each L_div feature perturbation (multiplicative
N(1, 0.36) per dimension then re-normalised, vs additive) and reports, for the fixed sample
prompts, what `generate` would give: the training L_rec (last logged average), the diversity of
images from one prompt under that perturbation (mean pairwise L1 on a [0, 1] scale), and how far
the perturbed features stay from the prompt (mean cosine).

Random-weight models (a small StyleGAN2, a small ViT CLIP, a random-trunk LPIPS and facenet) so
it needs no downloads; the numbers measure the loop's cost per loss, not the quality. Each row is
a fresh run of `run_training` in a temporary directory; steps/s excludes set-up and the final
checkpoint/sample sheet.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def small_models(resolution: int, seed: int = 0):
    """G, CLIP and D at `resolution` (channels capped at 64), random weights."""
    import torch

    from clip2gan_cli.clip import load_clip
    from clip2gan_cli.stylegan2.networks import build_discriminator, build_generator

    generator = build_generator(resolution, z_dim=64, w_dim=64, channel_base=2048, channel_max=64,
                                mapping_layers=2, seed=seed)
    clip_config = {"embed_dim": 64,
                   "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
                   "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = load_clip("bench-clip", pretrained=None, config=clip_config, device="cpu")
    discriminator = build_discriminator(resolution, channel_base=2048, channel_max=64, seed=seed + 1)
    return generator, clip, discriminator


ROWS = [  # (label, config overrides): each loss on its own, then all five
    ("L_rec", dict(lambda_lpips=0.0, lambda_adv=0.0, lambda_id=0.0, lambda_div=0.0)),
    ("L_rec + L_LPIPS (alex)", dict(lambda_adv=0.0, lambda_id=0.0, lambda_div=0.0)),
    ("L_rec + L_G (WGAN-GP)", dict(lambda_lpips=0.0, lambda_id=0.0, lambda_div=0.0)),
    ("L_rec + L_id (facenet)", dict(lambda_lpips=0.0, lambda_adv=0.0, lambda_div=0.0, identity="on")),
    ("L_rec + L_div", dict(lambda_lpips=0.0, lambda_adv=0.0, lambda_id=0.0)),
    ("all five", dict(identity="on")),
]


def full_size_models(resolution: int, seed: int = 0):
    """Config-f G and D at `resolution` and a ViT-B-16 CLIP, random weights."""
    import torch

    from clip2gan_cli.clip import load_clip
    from clip2gan_cli.stylegan2.networks import build_discriminator, build_generator

    generator = build_generator(resolution, seed=seed)
    discriminator = build_discriminator(resolution, seed=seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = load_clip("ViT-B-16", pretrained=None, device="cpu")
    return generator, clip, discriminator


def peak_memory_gib(device: str) -> float:
    """Peak RSS of this process (CPU) or peak CUDA memory allocated by torch, in GiB."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def one_full_size_run(args) -> None:
    """Child process: one run_training at full size; prints one JSON line with s/step and peak memory."""
    import torch

    from clip2gan_cli.train.config import TrainConfig
    from clip2gan_cli.train.trainer import TrainModels, run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    generator, clip, discriminator = full_size_models(args.resolution)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, device=args.device, num_workers=0,
                         log_every=1, sample_every=10 ** 9, checkpoint_every=10 ** 9, num_sample_images=0,
                         lpips_backbone="random", identity="off", checkpoint_blocks=args.checkpointing)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        run_training(config, Path(tmp) / "run", models=TrainModels(generator, clip, discriminator),
                     progress=False, log=lambda _: None)
        last = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    print(json.dumps({"batch": args.batch_size, "checkpointing": args.checkpointing,
                      "s_per_step": 1 / last["steps_per_s"], "peak_gib": peak_memory_gib(args.device)}), flush=True)


def full_size_bench(args) -> None:
    """Parent: each (checkpointing, batch) in a fresh process, then the per-sample memory and the time cost."""
    import subprocess
    import sys

    modes = ["off", "on"] if args.checkpointing == "both" else [args.checkpointing]
    memory_kind = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"device {args.device}, config-f G+D {args.resolution}px, ViT-B-16 CLIP, random weights, default losses, "
          f"{args.steps} step(s) per run, each run a fresh process; memory = {memory_kind}", flush=True)
    results = {}
    for mode in reversed(modes):  # "on" first: the run that must fit
        for batch in (1, 2):
            command = [sys.executable, __file__, "--one-run", "--resolution", str(args.resolution),
                       "--batch-size", str(batch), "--checkpointing", mode, "--steps", str(args.steps),
                       "--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                sys.exit(f"bench/train.py: the run (checkpointing {mode}, batch {batch}) failed "
                         f"(exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            results[mode, batch] = json.loads(lines[-1])
            row = results[mode, batch]
            print(f"  checkpointing {mode:<3} batch {batch}: {row['s_per_step']:8.2f} s/step  "
                  f"{row['peak_gib']:7.2f} GiB", flush=True)
    print(f"{'checkpointing':<15}{'s/step b1':>11}{'s/step b2':>11}{'GiB b1':>9}{'GiB b2':>9}{'GiB/sample':>12}")
    for mode in modes:
        one, two = results[mode, 1], results[mode, 2]
        print(f"{mode:<15}{one['s_per_step']:>11.2f}{two['s_per_step']:>11.2f}{one['peak_gib']:>9.2f}"
              f"{two['peak_gib']:>9.2f}{two['peak_gib'] - one['peak_gib']:>12.2f}")
    if len(modes) == 2:
        for batch in (1, 2):
            cost = results["on", batch]["s_per_step"] / results["off", batch]["s_per_step"] - 1
            print(f"checkpointing step-time cost at batch {batch}: {100 * cost:+.0f} %")
        per_sample = {mode: results[mode, 2]["peak_gib"] - results[mode, 1]["peak_gib"] for mode in modes}
        print(f"memory per additional sample: {per_sample['off']:.2f} GiB off -> {per_sample['on']:.2f} GiB on")


def checkpointing_cost(args) -> None:
    """Median seconds of synthesis + D forward/backward with checkpointing off and on, alternating."""
    import statistics

    import torch

    from clip2gan_cli.stylegan2.networks import build_discriminator, build_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    channel_base = 16384 if args.resolution <= 256 else 32768
    G = build_generator(args.resolution, channel_base=channel_base, seed=0).eval().requires_grad_(False)
    D = build_discriminator(args.resolution, channel_base=channel_base, seed=1).train().requires_grad_(False)
    ws = torch.randn([2 * args.batch_size, G.num_ws, G.w_dim], generator=torch.Generator().manual_seed(0))

    def step(checkpointing: bool) -> float:
        G.synthesis.checkpoint_blocks = D.checkpoint_blocks = checkpointing
        w = ws.clone().requires_grad_(True)
        started = time.perf_counter()
        images = G.synthesis(w, noise_mode="const")
        loss = images.square().mean() - D(images[: args.batch_size]).mean()
        loss.backward()
        return time.perf_counter() - started

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    for _ in range(args.steps):
        for checkpointing in (False, True):
            times[checkpointing].append(step(checkpointing))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"config-f {args.resolution}px, G batch {2 * args.batch_size}, D batch {args.batch_size}, "
          f"{args.steps} alternating reps: off {off:.2f} s, on {on:.2f} s, "
          f"checkpointing costs {100 * (on / off - 1):+.0f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run (default 10; 1 in memory mode; alternating reps in cost mode)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--compare-noise", action="store_true", help="compare the two L_div perturbations")
    parser.add_argument("--pack", default=None, help="pack for --compare-noise (default: random small models)")
    parser.add_argument("--samples", type=int, default=8, help="images per prompt for --compare-noise")
    parser.add_argument("--mode", choices=("losses", "memory", "cost"), default=None,
                        help="losses: small models, one row per loss; memory: full size, batch 1 vs 2 "
                             "(default: memory at --resolution >= 512)")
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                        help="memory mode: activation checkpointing of the G and D blocks")
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)  # memory mode's child process
    args = parser.parse_args()
    memory_mode = args.mode == "memory" or (args.mode is None and args.resolution >= 512)
    if args.steps is None:
        args.steps = 1 if memory_mode or args.one_run else 10
    if args.one_run:
        one_full_size_run(args)
        return
    if args.mode == "cost":
        checkpointing_cost(args)
        return
    if memory_mode:
        full_size_bench(args)
        return
    if args.compare_noise:
        compare_noise(args)
        return

    import torch

    from clip2gan_cli.train.config import TrainConfig
    from clip2gan_cli.train.losses import build_identity_net
    from clip2gan_cli.train.trainer import TrainModels, run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    generator, clip, discriminator = small_models(args.resolution)
    identity = build_identity_net(None)
    print(f"device {args.device}, G {args.resolution}px, batch {args.batch_size}, {args.steps} steps per row, "
          f"{torch.get_num_threads()} threads")
    print(f"{'losses':<26}{'steps/s':>10}{'ms/step':>10}")
    for label, overrides in ROWS:
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, device=args.device, num_workers=0,
                             log_every=args.steps, sample_every=args.steps, checkpoint_every=args.steps,
                             lpips_backbone="random", num_sample_images=2, sample_prompts=["a red circle"],
                             **{"identity": "off", **overrides})
        models = TrainModels(generator, clip, discriminator if config.lambda_adv > 0 else None,
                             identity if config.identity == "on" else None)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            run_training(config, Path(tmp) / "run", models=models, progress=False, log=lambda _: None)
            total = time.perf_counter() - started
            # The metrics line of the last step is logged before its sample sheet and checkpoint are
            # written, so this speed is the training loop's alone.
            last = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1]
        speed = json.loads(last)["steps_per_s"]
        print(f"{label:<26}{speed:>10.2f}{1000 / speed:>10.0f}   (run with set-up: {total:.1f} s)", flush=True)


def compare_noise(args) -> None:
    """Train once per perturbation mode and measure reconstruction, diversity and prompt fidelity."""
    import torch

    from clip2gan_cli.mapper import perturb_clip_features
    from clip2gan_cli.metrics.diversity import l1_distance, mean_pairwise_distance
    from clip2gan_cli.train.config import TrainConfig
    from clip2gan_cli.train.trainer import TrainModels, build_models, run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    base = TrainConfig(steps=args.steps, batch_size=args.batch_size, device=args.device, num_workers=0,
                       log_every=max(1, args.steps // 10), sample_every=args.steps, checkpoint_every=args.steps,
                       lpips_backbone="random", identity="off", pack=args.pack or "",
                       sample_prompts=["a red circle on a white background", "a small blue square",
                                       "a large green triangle on a black background"])
    if args.pack:
        models = build_models(base, torch.device(args.device))
    else:
        generator, clip, discriminator = small_models(args.resolution)
        models = TrainModels(generator, clip, discriminator)
    print(f"{'mode':<16}{'L_rec':>10}{'diversity_l1':>14}{'cos(f1, f)':>12}")
    for mode in ("multiplicative", "additive"):
        config = base.updated({"div_mode": mode})
        with tempfile.TemporaryDirectory() as tmp:
            result = run_training(config, Path(tmp) / "run", models=models, progress=False, log=lambda _: None)
        mapper = result.mapper_ema
        generator, clip = models.generator, models.clip
        with torch.no_grad():
            prompt_features = clip.encode_text(config.sample_prompts)
            images_by_prompt, cosines = [], []
            for index, feature in enumerate(prompt_features):
                repeated = feature.expand(args.samples, -1)
                noise = torch.Generator().manual_seed(index)
                perturbed = perturb_clip_features(repeated, mode, config.div_std, noise)
                cosines.append(float((perturbed * repeated).sum(1).mean()))
                images_by_prompt.append(generator.synthesis(mapper(perturbed), noise_mode="const").clamp(-1, 1))
        diversity = mean_pairwise_distance(images_by_prompt, l1_distance)
        print(f"{mode:<16}{result.final_losses.get('rec', float('nan')):>10.4f}{diversity:>14.4f}"
              f"{sum(cosines) / len(cosines):>12.3f}", flush=True)


if __name__ == "__main__":
    main()
