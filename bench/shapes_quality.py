"""End-to-end quality report of the builtin `shapes` pack, measured by an independent checker.

The checker is a small CNN trained on `packs.shapes.data.sample()` (clip2gan_cli.recipes.shapes.checker);
it never sees the pack's CLIP or generator. Sections:

  generate   every colour x shape prompt ("a red circle"), n images: colour / shape / joint accuracy,
             with the mapper's generation prior and with the text prior (the paper), side by side
  diversity  mean pixel L1 between images of one prompt; distinct positions and sizes per prompt
  edit       real images of each colour edited toward every other colour, six text forms (the
             colour word; with --neutral "a <shape>"; with --neutral "<source colour>"; with --neutral
             auto; "a <target> <shape>" with --neutral "a <source> <shape>" and with --neutral auto),
             each with the paper's setting and with the mapper's edit defaults
             (--direction/--layers/--beta): target-colour success; shape, size, position kept; for
             auto, how often the inferred neutral names the source
  fd         Frechet distance in the pack's CLIP image space (metrics.fid, the eval-fid code):
             real vs real (the floor), G(z) vs real, text-generated vs real (both priors)
  noise      the two readings of the diversity noise (multiplicative / additive), side by side
  latency    median wall time of `clip2gan --help` and of a cold `clip2gan generate "a red circle" -n 8`

    python bench/shapes_quality.py                  # full report
    python bench/shapes_quality.py -n 8 --skip latency --json report.json --grid grid.png
    python bench/shapes_quality.py --pack-dir work_full/pack --skip latency   # a rebuild, before it ships
Targets: colour >= 90 %, shape >= 80 %, edit success >= 80 % with shape kept >= 80 %.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clip2gan_cli.packs.shapes import data

REPO = Path(__file__).resolve().parents[1]

COLOR_NAMES, SIZE_NAMES = list(data.COLORS), list(data.SIZES)


def prompts_grid() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour x shape pair."""
    return [(f"a {color} {shape}", color, shape) for shape in data.SHAPES for color in data.COLORS]


def section_generate(pack, checker, n: int, seed: int, feature_noise=None, prior=None) -> dict:
    """Checker accuracy of n generated images per colour x shape prompt, plus diversity measures."""
    from clip2gan_cli.pipeline import generate

    rows = prompts_grid()
    result = generate(pack.generator, pack.clip, pack.mapper, [p for p, _, _ in rows], n=n, seed=seed,
                      feature_noise=feature_noise, prior=prior)
    images = result.images.float().clamp(-1, 1)
    predictions = checker.predict(images)
    per_prompt = {}
    for index, (prompt, color, shape) in enumerate(rows):
        part = slice(index * n, (index + 1) * n)
        colour_ok = predictions["color"][part] == COLOR_NAMES.index(color)
        shape_ok = predictions["shape"][part] == data.SHAPES.index(shape)
        group = images[part]
        l1 = [(group[i] - group[j]).abs().mean().item() for i in range(n) for j in range(i + 1, n)]
        positions = predictions["position"][part].round()
        per_prompt[prompt] = {
            "color": float(colour_ok.float().mean()), "shape": float(shape_ok.float().mean()),
            "joint": float((colour_ok & shape_ok).float().mean()),
            "pixel_l1": float(np.mean(l1)) if l1 else 0.0,
            "distinct_positions": len({tuple(p) for p in positions.tolist()}),
            "distinct_sizes": len(set(predictions["size"][part].tolist())),
            "distinct_backgrounds": len(set(predictions["background"][part].tolist())),
        }
    mean = {key: float(np.mean([row[key] for row in per_prompt.values()])) for key in next(iter(per_prompt.values()))}
    return {"per_prompt": per_prompt, "mean": mean, "images": images}


EDIT_FORMS = {  # form -> (edit text, neutral text) from (source colour, target colour, shape)
    "word": lambda src, tgt, shape: (tgt, None),                                     # the paper's "blue"
    "word --neutral shape": lambda src, tgt, shape: (tgt, f"a {shape}"),
    "word --neutral word": lambda src, tgt, shape: (tgt, src),                        # "blue" vs "red"
    "word --neutral auto": lambda src, tgt, shape: (tgt, "auto"),                     # CLIP names the source
    "described": lambda src, tgt, shape: (f"a {tgt} {shape}", f"a {src} {shape}"),  # names what it shows
    "described --neutral auto": lambda src, tgt, shape: (f"a {tgt} {shape}", "auto"),
}
AUTO_EXPECTED = {  # what --neutral auto should infer for a form (the text naming the source image)
    "word --neutral auto": lambda src, shape: src,
    "described --neutral auto": lambda src, shape: f"a {src} {shape}",
}


def edit_cases(per_source: int, seed: int) -> list[dict]:
    """Real images of each colour, each to be edited toward another colour (all five in turn)."""
    rng = np.random.default_rng(seed)
    cases = []
    for source_index, source in enumerate(COLOR_NAMES):
        for k in range(per_source):
            shape, size = data.SHAPES[rng.integers(len(data.SHAPES))], SIZE_NAMES[rng.integers(2)]
            background = list(data.BACKGROUNDS)[rng.integers(len(data.BACKGROUNDS))]
            x, y = (16 + rng.uniform(-data.JITTER, data.JITTER, 2)).tolist()
            image = torch.from_numpy(data.render(shape, source, size, background, x, y)).permute(2, 0, 1)
            cases.append({"source": source, "target": COLOR_NAMES[(source_index + 1 + k % 5) % 6], "shape": shape,
                          "size": size, "xy": (x, y), "image": image[None].float() / 127.5 - 1})
    return cases


def score_edits(pack, checker, cases: list[dict], form: str, direction: str, layers, beta: float) -> dict:
    """Edit every case with one text form and setting; checker rates target colour and what was kept."""
    from clip2gan_cli.pipeline import edit

    rows = []
    for case in cases:
        text, neutral = EDIT_FORMS[form](case["source"], case["target"], case["shape"])
        out = edit(pack.generator, pack.clip, pack.mapper, case["image"], [(text, beta)], neutral=neutral,
                   direction=direction, layers=layers)
        after = checker.predict(out.edited.float())
        target_ok = int(after["color"][0]) == COLOR_NAMES.index(case["target"])
        shape_ok = int(after["shape"][0]) == data.SHAPES.index(case["shape"])
        row = {"target_color": target_ok, "shape_kept": shape_ok, "both": target_ok and shape_ok,
               "size_kept": int(after["size"][0]) == SIZE_NAMES.index(case["size"]),
               "position_kept": float((after["position"][0] - torch.tensor(case["xy"])).abs().max()) <= 2.0}
        if form in AUTO_EXPECTED:
            row["neutral_named_source"] = out.neutrals[0][0] == AUTO_EXPECTED[form](case["source"], case["shape"])
        rows.append(row)
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def section_edit(pack, checker, per_source: int, betas: list[float], seed: int) -> dict:
    """Every text form with the paper's setting (text direction, all rows, beta 1) and with the
    mapper's own edit defaults; then a beta sweep of the defaults."""
    from clip2gan_cli.pipeline import edit

    config = pack.mapper.config
    default_beta = config.edit_beta if config.edit_beta is not None else 2.0
    cases = edit_cases(per_source, seed)
    reconstruction = checker.predict(torch.cat([
        edit(pack.generator, pack.clip, pack.mapper, case["image"], []).reconstruction for case in cases]).float())
    settings = {"paper (text, all rows, beta 1)": ("text", None, 1.0),
                f"pack default ({config.edit_direction}, rows {_rows(config.edit_layers)}, beta {default_beta:g})":
                    (config.edit_direction, config.edit_layers, default_beta)}
    result = {"cases": len(cases), "reconstruction": {
        "color": float(np.mean([int(c) == COLOR_NAMES.index(case["source"])
                                for c, case in zip(reconstruction["color"], cases)])),
        "shape": float(np.mean([int(s) == data.SHAPES.index(case["shape"])
                                for s, case in zip(reconstruction["shape"], cases)]))},
        "forms": {}, "beta_sweep": {}}
    for label, (direction, layers, beta) in settings.items():
        for form in EDIT_FORMS:
            result["forms"][f"{form} | {label}"] = score_edits(pack, checker, cases, form, direction, layers, beta)
    for beta in betas:
        for form in EDIT_FORMS:
            result["beta_sweep"][f"{form} | beta {beta:g}"] = score_edits(
                pack, checker, cases, form, config.edit_direction, config.edit_layers, beta)
    return result


def _rows(layers) -> str:
    return "all" if layers is None else ":".join("" if v is None else str(v) for v in layers)


def section_fd(pack, n: int, seed: int) -> dict:
    """Frechet distances in the pack's CLIP image space (the eval-fid feature space and formula)."""
    from clip2gan_cli.metrics.fid import ClipFeatureSpace, frechet_distance
    from clip2gan_cli.pipeline import generate

    space = ClipFeatureSpace(pack.clip, weights_sha256="", device="cpu")

    def features(images_uint8: torch.Tensor) -> torch.Tensor:
        return torch.cat([space.extract(images_uint8[i:i + 256]) for i in range(0, len(images_uint8), 256)])

    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    real_a = torch.from_numpy(data.sample(n, seed)[0]).permute(0, 3, 1, 2)
    real_b = torch.from_numpy(data.sample(n, seed + 1)[0]).permute(0, 3, 1, 2)
    z = torch.randn(n, pack.generator.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        unconditional = torch.cat([pack.generator(z[i:i + 64]) for i in range(0, n, 64)])
    combos = [f"a {z_} {c} {s} on a {b} background" for s in data.SHAPES for c in data.COLORS
              for z_ in data.SIZES for b in data.BACKGROUNDS]
    per_prompt = max(1, n // len(combos))
    real_features = features(real_a)
    result = {
        "real_vs_real": frechet_distance(features(real_b), real_features),
        "G(z)_vs_real": frechet_distance(features(to_uint8(unconditional)), real_features),
    }
    priors = dict.fromkeys([pack.mapper.config.generation_prior, "text"])  # the pack's first, then the paper's
    for prior in priors:
        text_images = generate(pack.generator, pack.clip, pack.mapper, combos, n=per_prompt, seed=seed,
                               prior=prior).images
        result[f"text_vs_real ({prior} prior)"] = frechet_distance(features(to_uint8(text_images)), real_features)
    return {**result, "n": n, "text_images": len(text_images)}


def section_latency(runs: int) -> dict:
    """Median wall seconds of `clip2gan --help` and of a cold generate (fresh process each time)."""
    executable = str(Path(sys.executable).with_name("clip2gan"))
    timings = {}
    with tempfile.TemporaryDirectory() as out:
        for label, args in (("help", ["--help"]),
                            ("generate", ["generate", "a red circle", "-n", "8", "--out", out, "--device", "cpu"])):
            walls = []
            for _ in range(runs):
                start = time.perf_counter()
                done = subprocess.run([executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env={**os.environ, "CLIP2GAN_OFFLINE": "1"})
                walls.append(time.perf_counter() - start)
                if done.returncode != 0:
                    raise SystemExit(f"clip2gan {' '.join(args)} failed: {done.stderr.decode()[-300:]}")
            timings[label] = statistics.median(walls)
    return {"help_s": timings["help"], "generate_s": timings["generate"], "runs": runs,
            "goals_s": {"help": 0.3, "generate": 5.0}}


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """One row per prompt (colour x shape order), `images.shape[0] // rows` samples per row, 2x upscaled."""
    from PIL import Image

    per_row = images.shape[0] // rows
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    grid = pixels.reshape(rows, per_row, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 32, per_row * 32, 3)
    Image.fromarray(grid).resize((per_row * 64, rows * 64), Image.NEAREST).save(path)


def print_report(report: dict) -> None:
    gen = report["generate"]
    print(f"\n== generate ({gen['prior']} prior): checker joint accuracy per prompt (n={report['n']}) ==")
    print("shape \\ colour " + "".join(f"{c:>9}" for c in COLOR_NAMES))
    for shape in data.SHAPES:
        cells = "".join(f"{gen['per_prompt'][f'a {c} {shape}']['joint']:>9.2f}" for c in COLOR_NAMES)
        print(f"{shape:<15}{cells}")
    m = gen["mean"]
    print(f"mean: colour {m['color']:.3f}  shape {m['shape']:.3f}  joint {m['joint']:.3f}   "
          f"(targets: colour >= 0.90, shape >= 0.80)")
    print(f"\n== diversity (same prompt) ==\npixel L1 {m['pixel_l1']:.3f}  distinct positions {m['distinct_positions']:.1f}"
          f"  sizes {m['distinct_sizes']:.2f}  backgrounds {m['distinct_backgrounds']:.2f}  (of n={report['n']})")
    if "generate_text_prior" in report:
        t = report["generate_text_prior"]["mean"]
        print(f"\n== generate with the text prior (the paper: the prompt's feature itself) ==\n"
              f"colour {t['color']:.3f}  shape {t['shape']:.3f}  joint {t['joint']:.3f}  pixel L1 {t['pixel_l1']:.3f}  "
              f"distinct positions {t['distinct_positions']:.1f}  backgrounds {t['distinct_backgrounds']:.2f}")
    if "edit" in report:
        edit = report["edit"]
        rec = edit["reconstruction"]
        print(f"\n== edit: {edit['cases']} real images, each colour toward each other colour ==")
        print(f"inversion keeps: colour {rec['color']:.2f}  shape {rec['shape']:.2f}")
        print(f"{'form | setting':<76}{'target':>8}{'shape':>7}{'both':>6}{'size':>6}{'pos':>6}{'auto':>6}")
        for name, row in [*edit["forms"].items(), *edit["beta_sweep"].items()]:
            auto = f"{row['neutral_named_source']:>6.2f}" if "neutral_named_source" in row else ""
            print(f"{name:<76}{row['target_color']:>8.2f}{row['shape_kept']:>7.2f}{row['both']:>6.2f}"
                  f"{row['size_kept']:>6.2f}{row['position_kept']:>6.2f}{auto}")
        print("(auto: share of --neutral auto edits whose inferred neutral names the source image)")
        print("(targets: target colour >= 0.80 with shape kept >= 0.80)")
    if "fd" in report:
        print("\n== FD in the pack's CLIP space ==")
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in report["fd"].items()))
    if "noise" in report:
        print(f"\n== diversity-noise interpretations, text prior (mapper trained with {report['noise_trained_with']}) ==")
        for mode, row in report["noise"].items():
            print(f"{mode:<15} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    if "latency" in report:
        lat = report["latency"]
        print(f"\n== latency (median of {lat['runs']}) ==\nclip2gan --help {lat['help_s']:.2f} s (goal 0.3)   "
              f"cold generate -n 8 {lat['generate_s']:.2f} s (goal 5)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Quality report of the builtin shapes pack.")
    parser.add_argument("-n", type=int, default=16, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checker", type=Path, default=REPO / "work_shapes" / "checker.pt",
                        help="checker weights (trained and saved there if missing)")
    parser.add_argument("--edit-per-source", type=int, default=20, help="edited images per source colour")
    parser.add_argument("--edit-betas", type=float, nargs="*", default=[],
                        help="also sweep these betas with the mapper's edit defaults")
    parser.add_argument("--fd-n", type=int, default=1024)
    parser.add_argument("--latency-runs", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["edit", "fd", "noise", "latency"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="write a prompts x samples grid PNG")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pack-dir", type=Path, default=None,
                        help="measure the pack files in this folder (a rebuild) instead of the installed pack")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from clip2gan_cli.recipes.shapes.checker import checker_accuracy, load_or_train_checker

    from clip2gan_cli.packs import load_models, load_pack

    checker = load_or_train_checker(args.checker)
    if args.pack_dir is None:
        pack = load_pack(device="cpu")
    else:
        pack = load_models(mapper=args.pack_dir / "mapper.safetensors", generator=str(args.pack_dir / "generator.safetensors"),
                           clip=str(args.pack_dir / "clip_config.json"), device="cpu")
    report = {"n": args.n, "checker_on_real": checker_accuracy(checker, n=1000)}
    generated = section_generate(pack, checker, args.n, args.seed)
    if args.grid is not None:
        save_grid(generated["images"], len(prompts_grid()), args.grid)
    report["generate"] = {"prior": pack.mapper.config.generation_prior,
                          **{k: v for k, v in generated.items() if k != "images"}}
    if pack.mapper.config.generation_prior != "text":
        text_generated = section_generate(pack, checker, args.n, args.seed, prior="text")
        report["generate_text_prior"] = {k: v for k, v in text_generated.items() if k != "images"}
    if "edit" not in args.skip:
        report["edit"] = section_edit(pack, checker, args.edit_per_source, args.edit_betas, args.seed)
    if "fd" not in args.skip:
        report["fd"] = section_fd(pack, args.fd_n, args.seed)
    if "noise" not in args.skip:
        # Same strength for both readings; the mapper was trained with one of them (noise_trained_with).
        strength = pack.mapper.config.noise_strength
        report["noise_trained_with"] = {"mode": pack.mapper.config.noise_mode, "strength": strength}
        report["noise"] = {}
        for mode in ("multiplicative", "additive"):
            mean = section_generate(pack, checker, args.n, args.seed, feature_noise=(mode, strength), prior="text")["mean"]
            report["noise"][mode] = {k: mean[k] for k in ("color", "shape", "joint", "pixel_l1", "distinct_positions")}
    if "latency" not in args.skip:
        report["latency"] = section_latency(args.latency_runs)
    print(f"checker on real samples: {json.dumps(report['checker_on_real'])}")
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
