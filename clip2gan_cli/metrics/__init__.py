"""Evaluation: FID/KID (torch-fidelity), CLIP score and diversity, behind one call (`evaluate`).

`clip2gan eval-fid` is a thin layer over `evaluate(EvalConfig) -> dict` (the JSON report),
`report_table(report)` (the terminal table) and `write_report(report, path)` (atomic write).

The real set is always a folder; the fake set is a folder (`fake`) or images generated on the
fly from a pack and a prompts file (`pack`, `prompts`, `images_per_prompt`), never written to
disk: generated images are quantised to 8 bits exactly as a saved PNG, so both routes give the
same numbers for the same images. Generation holds one prompt's images in memory at a time.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserInputError

FEATURE_KINDS = ("inception", "clip")
INCEPTION_WEIGHTS = "inception-fid"  # registry name of torch-fidelity's FID Inception


@dataclass
class EvalConfig:
    """What `evaluate` computes; one field per `eval-fid` option."""

    real: Path                                  # folder of real images (statistics cached)
    fake: Path | None = None                    # folder of generated images, or ...
    pack: str | None = None                     # ... a pack (also the CLIP of --features clip; default shapes)
    prompts: Path | None = None                 # ... and a prompts file (one prompt per line)
    images_per_prompt: int | None = None        # -n: images generated per prompt
    features: str = "inception"                 # inception | clip (FD_CLIP)
    kid: bool = False                           # also compute KID
    kid_subset_size: int = 1000                 # KID subset size (each set needs at least this many images)
    kid_subsets: int = 100                      # number of KID subsets
    inception_weights: Path | None = None       # a local torch-fidelity Inception file instead of the registry's
    device: str = "auto"
    backend: str = "auto"                       # StyleGAN2 kernels for generation
    batch_size: int = 32
    seed: int = 0                               # generation noise and KID subsets
    cache: bool = True                          # cache real-folder statistics
    progress: bool = True                       # progress bars on stderr


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read prompts file {path}: {error}") from error
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserInputError(f"prompts file {path} holds no prompt")
    return prompts


def validate_config(config: EvalConfig) -> None:
    """UserInputError for contradictory or missing options (before any model is loaded)."""
    if config.features not in FEATURE_KINDS:
        raise UserInputError(f"unknown --features '{config.features}'", hint="expected inception or clip")
    if (config.fake is None) == (config.prompts is None):
        raise UserInputError("give either --fake DIR or --prompts FILE (with --pack and -n), not both or neither")
    if config.prompts is not None and config.images_per_prompt is None:
        raise UserInputError("--prompts needs -n (images generated per prompt)")
    if config.prompts is None and config.images_per_prompt is not None:
        raise UserInputError("-n only applies with --prompts")
    if config.images_per_prompt is not None and config.images_per_prompt < 1:
        raise UserInputError(f"-n must be at least 1, got {config.images_per_prompt}")
    if config.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.inception_weights is not None and config.features != "inception":
        raise UserInputError("--inception-weights only applies with --features inception")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (from installed metadata)."""
    from importlib import metadata

    from .. import __version__

    versions = {"clip2gan": __version__}
    for label, distribution in (("torch", "torch"), ("torch-fidelity", "torch-fidelity"),
                                ("open_clip", "open_clip_torch"), ("lpips", "lpips")):
        try:
            versions[label] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[label] = "not installed"
    return versions


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _clip_weights_sha256(pack) -> str:
    """sha256 of the pack's CLIP weights: pinned in the registry, else hashed from the file or the tensors."""
    from .. import weights
    from . import fid

    reference = getattr(pack.info, "clip_weights", None) if pack.info is not None else None
    entry = weights.load_registry().files.get(reference) if reference else None
    if entry is not None and entry.sha256:
        return entry.sha256  # fetch() verified the file against it; no need to hash 600 MB again
    clip_weights = pack.paths.get("clip_weights")
    return fid.sha256_file(clip_weights) if clip_weights else fid.state_dict_sha256(pack.clip)


def _feature_space(config: EvalConfig, pack, device):
    from . import fid

    if config.features == "clip":
        return fid.ClipFeatureSpace(pack.clip, weights_sha256=_clip_weights_sha256(pack), device=device)
    if config.inception_weights is not None:
        return fid.InceptionFeatureSpace(config.inception_weights, device=device)
    from .. import weights

    registry = weights.load_registry()
    path = weights.fetch(INCEPTION_WEIGHTS, registry=registry, progress=config.progress)
    return fid.InceptionFeatureSpace(path, device=device, weights_sha256=registry.entry(INCEPTION_WEIGHTS).sha256)


def _generated_set(config: EvalConfig, prompts: list[str], pack, space, warn: Callable[[str], None]) -> dict:
    """Generate -n images per prompt, one prompt at a time: features, CLIP scores, diversity sample."""
    import torch
    from tqdm import tqdm

    from ..pipeline import generate
    from . import clip_score, diversity, fid

    n = config.images_per_prompt
    features, scores, diversity_sample = [], [], []
    with tqdm(total=len(prompts) * n, desc="generating", unit="img", file=sys.stderr,
              disable=not config.progress, leave=False) as bar:
        for prompt in prompts:
            result = generate(pack.generator, pack.clip, pack.mapper, [prompt], n=n, seed=config.seed,
                              batch_size=config.batch_size, progress=bar.update)
            images_uint8 = fid.images_to_uint8(result.images)  # what a saved PNG would hold
            features.append(fid.extract_features(list(images_uint8), space, batch_size=config.batch_size))
            scores.append(clip_score.clip_scores(pack.clip, prompt, images_uint8, batch_size=config.batch_size))
            diversity_sample.append(images_uint8[:diversity.DIVERSITY_SAMPLE])
    report = {
        "features_tensor": torch.cat(features),
        "n_prompts": len(prompts),
        "images_per_prompt": n,
        "generation_prior": pack.mapper.config.generation_prior,  # what made the images (text or retrieval)
        "clip_score": clip_score.mean_clip_score(scores),
    }
    report.update(diversity.diversity(diversity_sample, device=pack.device, batch_size=config.batch_size,
                                      progress=config.progress, warn=warn))
    if n < 2:
        warn("Warning: -n 1 gives one image per prompt; diversity needs at least 2 and is not reported")
    return report


def evaluate(config: EvalConfig, warn: Callable[[str], None] = _warn) -> dict:
    """Compute FID (and KID, CLIP score, diversity) as configured; returns the JSON-able report.

    Keys: `fid` (FD_CLIP when `features` is "clip"), `features`, `feature_weights_sha256`, `n_real`, `n_fake`, `n_real_skipped`,
    `n_fake_skipped`, `real_stats_cached`, `seed`, `versions`, and where computed `kid_mean`, `kid_std`,
    `kid_subset_size`, `kid_subsets`, `clip_score`, `diversity_lpips` (or `diversity_l1` with
    `diversity_note`), `n_prompts`, `images_per_prompt`, `generation_prior`.
    """
    from ..device import disable_tf32, resolve_device, seed_everything
    from . import fid

    validate_config(config)
    # Bad folders or a bad prompts file fail here, before any weights are fetched or models loaded.
    fid.list_image_files(config.real)
    if config.fake is not None:
        fid.list_image_files(config.fake)
    prompts = read_prompts_file(config.prompts) if config.prompts is not None else None
    device = resolve_device(config.device)
    if device.type == "cuda":
        disable_tf32()  # true float32: the same numbers on every GPU
    seed_everything(config.seed)

    pack = None
    if config.features == "clip" or config.prompts is not None:
        from ..packs import load_pack

        pack = load_pack(config.pack, device=device, backend=config.backend,
                         need_mapper=config.prompts is not None)
    space = _feature_space(config, pack, device)

    real = fid.folder_features(config.real, space, batch_size=config.batch_size, cache=config.cache,
                               progress=config.progress)
    fid.check_enough_images(real.n_images, fid.MIN_IMAGES_FID, f"--real {config.real}", "FID")
    report: dict = {"features": config.features}
    if config.fake is not None:
        fake = fid.folder_features(config.fake, space, batch_size=config.batch_size, cache=False,
                                   progress=config.progress)
        fake_features, n_fake_skipped = fake.features, fake.n_skipped
    else:
        generated = _generated_set(config, prompts, pack, space, warn)
        fake_features, n_fake_skipped = generated.pop("features_tensor"), 0
        report.update(generated)
    fid.check_enough_images(len(fake_features), fid.MIN_IMAGES_FID, "the fake set", "FID")
    fake_statistics = fid.feature_statistics(fake_features)

    report["fid"] = fid.frechet_distance_from_statistics(real.statistics, fake_statistics)
    if config.kid:
        report["kid_mean"], report["kid_std"] = fid.kernel_distance(
            real.features, fake_features, subset_size=config.kid_subset_size, subsets=config.kid_subsets,
            seed=config.seed)
        report["kid_subset_size"], report["kid_subsets"] = config.kid_subset_size, config.kid_subsets
    dim = int(fake_features.shape[1])
    if min(real.n_images, len(fake_features)) < dim:
        warn(f"Warning: fewer images than feature dimensions ({dim}); FID is strongly biased at this size, "
             "compare only numbers computed with the same number of images")
    for label, count in (("real", real.n_skipped), ("fake", n_fake_skipped)):
        if count:
            warn(f"Warning: skipped {count} unreadable file(s) in the {label} folder")
    report.update({
        "feature_model": space.description,
        "feature_dim": dim,
        "feature_weights_sha256": space.weights_sha256,
        "n_real": real.n_images,
        "n_fake": int(len(fake_features)),
        "n_real_skipped": real.n_skipped,
        "n_fake_skipped": n_fake_skipped,
        "real_stats_cached": real.cache_hit,
        "real": str(config.real),
        "fake": str(config.fake) if config.fake is not None else None,
        "pack": pack.name if pack is not None else None,
        "prompts": str(config.prompts) if config.prompts is not None else None,
        "seed": config.seed,
        "device": str(device),
        "versions": package_versions(),
    })
    return report


# Rows of the terminal table: report key -> label (in this order; absent keys are left out).
TABLE_ROWS = (
    ("fid", "FID"), ("kid_mean", "KID mean"), ("kid_std", "KID std"), ("clip_score", "CLIP score"),
    ("diversity_lpips", "Diversity (LPIPS)"), ("diversity_l1", "Diversity (pixel L1, LPIPS unavailable)"),
    ("n_real", "real images"), ("n_fake", "fake images"), ("n_real_skipped", "real files skipped"),
    ("n_fake_skipped", "fake files skipped"), ("features", "features"), ("feature_model", "feature model"),
    ("feature_weights_sha256", "weights sha256"), ("real_stats_cached", "real stats from cache"),
)


def report_table(report: dict):
    """A rich Table of the report's metrics and counts."""
    from rich.table import Table

    title = "FD_CLIP" if report.get("features") == "clip" else "FID"
    table = Table(title=f"clip2gan eval-fid ({title})", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in TABLE_ROWS:
        if report.get(key) is None:
            continue
        value = report[key]
        if key == "fid" and report.get("features") == "clip":
            label = "FD_CLIP"
        if isinstance(value, float):
            text = f"{value:.6g}" if key.startswith("kid") else f"{value:.4f}"
        elif key == "feature_weights_sha256":
            text = f"{value[:16]}…"
        else:
            text = str(value)
        table.add_row(label, text)
    return table


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the report as indented JSON, atomically."""
    import json

    from ..fileutil import atomic_write_text

    return atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


__all__ = ["EvalConfig", "evaluate", "report_table", "write_report", "read_prompts_file", "package_versions",
           "FEATURE_KINDS"]
