"""`evaluate(EvalConfig) -> dict`: the eval-fid report, every number with what a reader needs to cite it.

The real set is a folder (statistics cached) or a statistics file; the fake set is a folder or
images generated on the fly from a pack and a prompts file, never written to disk: generated
images are quantised to 8 bits exactly as a saved PNG, so both routes give the same numbers for
the same images. Generation holds one prompt's images in memory at a time.

Every report names the feature space and its exact model, the weights' sha256, the fid mode and
resize, the image counts, the seed and the package versions; prompts add the CLIP score and
R-precision by a scoring CLIP (`score_clip`, the pack's own unless another is given: the report
says whether it is the generator's, which biases both upward).
"""
from __future__ import annotations

import sys
from typing import Callable

from .config import (DINOV2_WEIGHTS, INCEPTION_WEIGHTS, STABLE_FID_IMAGES, EvalConfig, read_prompts_file,
                     validate_config)
from .report import FD_NAMES, package_versions


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _clip_weights_sha256(pack) -> str:
    """sha256 of the pack's CLIP weights: pinned in the registry, else hashed from the file or the tensors."""
    from .. import weights
    from ..fileutil import sha256_file
    from .feature_spaces import state_dict_sha256

    reference = getattr(pack.info, "clip_weights", None) if pack.info is not None else None
    entry = weights.load_registry().files.get(reference) if reference else None
    if entry is not None and entry.sha256:
        return entry.sha256  # fetch() verified the file against it; no need to hash 600 MB again
    clip_weights = pack.paths.get("clip_weights")
    return sha256_file(clip_weights) if clip_weights else state_dict_sha256(pack.clip)


def _registry_file(name: str, progress: bool):
    """(local path, pinned sha256 or None) of a registry file, fetched and verified by `weights.fetch`."""
    from .. import weights

    registry = weights.load_registry()
    return weights.fetch(name, registry=registry, progress=progress), registry.entry(name).sha256


def _feature_space(config: EvalConfig, pack, device, clip_sha256: str | None):
    """The feature space; `clip_sha256` is the pack's CLIP weights' sha256 (given with `features` clip)."""
    from . import feature_spaces

    if config.features == "clip":
        return feature_spaces.ClipFeatureSpace(pack.clip, weights_sha256=clip_sha256, device=device)
    if config.features == "dinov2":
        path, sha256 = _registry_file(DINOV2_WEIGHTS, config.progress)
        return feature_spaces.DinoV2FeatureSpace(path, device=device, weights_sha256=sha256, mode=config.fid_mode,
                                                 model=DINOV2_WEIGHTS)
    if config.inception_weights is not None:
        return feature_spaces.InceptionFeatureSpace(config.inception_weights, device=device, mode=config.fid_mode)
    path, sha256 = _registry_file(INCEPTION_WEIGHTS, config.progress)
    return feature_spaces.InceptionFeatureSpace(path, device=device, weights_sha256=sha256, mode=config.fid_mode)


def _scoring_clip(config: EvalConfig, pack, device, warn: Callable[[str], None], clip_sha256: str | None):
    """(CLIP that scores prompts, report fields); warns when it is the CLIP that conditions the generator.

    `clip_sha256`: the pack's CLIP weights' sha256 where already computed (`features` clip), else hashed here.
    """
    from ..fileutil import sha256_file

    generator_sha256 = clip_sha256 if clip_sha256 is not None else _clip_weights_sha256(pack)
    if config.score_clip is None:
        clip, sha256, name = pack.clip, generator_sha256, f"{pack.clip.name} (the pack's)"
    else:
        from ..packs import load_clip_spec

        clip, paths = load_clip_spec(config.score_clip, device)
        sha256, name = sha256_file(paths["clip_weights"]), config.score_clip
    same = sha256 == generator_sha256
    if same:
        warn("Warning: the scoring CLIP is the one that conditions the generator: CLIP score and R-precision are "
             "biased upward; give `score_clip` MODEL:TAG of another CLIP for numbers to cite")
    return clip, {"score_clip": name, "score_clip_weights_sha256": sha256, "score_clip_is_generator_clip": same}


def _generated_set(config: EvalConfig, prompts: list[str], pack, space, warn: Callable[[str], None],
                   clip_sha256: str | None) -> dict:
    """Generate -n images per prompt, one prompt at a time: features, CLIP scores, R-precision, diversity."""
    import torch
    from tqdm import tqdm

    from ..pipeline import generate
    from . import clip_score, diversity, images

    scorer, report = _scoring_clip(config, pack, pack.device, warn, clip_sha256)
    n, ranked = config.images_per_prompt, len(prompts) >= 2
    prompt_features = clip_score.encode_prompts(scorer, prompts) if ranked else None  # once for every prompt
    features, scores, hits, diversity_sample = [], [], [], []
    with tqdm(total=len(prompts) * n, desc="generating", unit="img", file=sys.stderr,
              disable=not config.progress, leave=False) as bar:
        for index, prompt in enumerate(prompts):
            result = generate(pack.generator, pack.clip, pack.mapper, [prompt], n=n, seed=config.seed,
                              batch_size=config.batch_size, prior=config.prior, progress=bar.update)
            images_uint8 = images.images_to_uint8(result.images)  # what a saved PNG would hold
            features.append(_extract(images_uint8, space, config.batch_size))
            prompt_scores, prompt_hits = clip_score.score_and_rank(
                scorer, prompt, images_uint8, config.batch_size, ranking=(prompt_features, index) if ranked else None)
            scores.append(prompt_scores)
            if ranked:
                hits.append(prompt_hits)
            diversity_sample.append(images_uint8[:diversity.DIVERSITY_SAMPLE])
    report.update({
        "features_tensor": torch.cat(features), "n_prompts": len(prompts), "images_per_prompt": n,
        "generation_prior": config.prior or pack.mapper.config.generation_prior,  # what made the images
        "generation_precision": pack.precision,  # what the generator's num_fp16_res blocks ran in
        "clip_score": clip_score.mean_clip_score(scores),
        "r_precision": float(torch.cat(hits).float().mean()) if ranked else None,
        "r_precision_chance": 1.0 / len(prompts) if ranked else None,
    })
    if not ranked:
        warn("Warning: R-precision needs at least 2 prompts to rank; not reported")
    report.update(diversity.diversity(diversity_sample, device=pack.device, batch_size=config.batch_size,
                                      progress=config.progress, warn=warn))
    if n < 2:
        warn("Warning: -n 1 gives one image per prompt; diversity needs at least 2 and is not reported")
    return report


def _extract(images_uint8, space, batch_size: int):
    from . import feature_spaces

    return feature_spaces.extract_features(list(images_uint8), space, batch_size=batch_size)


def _real_set(config: EvalConfig, space) -> dict:
    """The real side: statistics (and features when from a folder) with counts; --save-stats written here."""
    from . import fid, stats_file

    if config.stats is not None:
        stats = stats_file.load_statistics(config.stats)
        stats_file.check_statistics_match(stats, space, config.stats)
        return {"statistics": {"mu": stats["mu"], "sigma": stats["sigma"]}, "features": None,
                "n_real": int(stats.get("n_images", 0)) or None, "n_real_skipped": stats.get("n_skipped"),
                "real_stats_cached": None, "stats_file": str(config.stats)}
    real = fid.folder_features(config.real, space, batch_size=config.batch_size, cache=config.cache,
                               progress=config.progress)
    fid.check_enough_images(real.n_images, fid.MIN_IMAGES_FID, f"`real` {config.real}", "FID")
    if config.save_stats is not None:
        stats_file.save_statistics(config.save_stats, real.statistics, space, real.n_images, real.n_skipped)
    return {"statistics": real.statistics, "features": real.features, "n_real": real.n_images,
            "n_real_skipped": real.n_skipped, "real_stats_cached": real.cache_hit,
            "saved_stats": str(config.save_stats) if config.save_stats is not None else None}


def _fake_set(config: EvalConfig, prompts, pack, space, warn, clip_sha256: str | None) -> tuple:
    """(features, report fields) of the generated side: a folder or images generated on the fly."""
    from . import fid

    if config.fake is not None:
        fake = fid.folder_features(config.fake, space, batch_size=config.batch_size, cache=False,
                                   progress=config.progress)
        return fake.features, {"n_fake_skipped": fake.n_skipped}
    generated = _generated_set(config, prompts, pack, space, warn, clip_sha256)
    features = generated.pop("features_tensor")
    generated["n_fake_skipped"] = 0
    return features, generated


def _distances(config: EvalConfig, real: dict, fake_features, warn: Callable[[str], None]) -> dict:
    """Frechet distance, precision/recall (k=3) and KID where the real features are at hand."""
    from . import fid, precision_recall

    fid.check_enough_images(len(fake_features), fid.MIN_IMAGES_FID, "the fake set", "FID")
    report = {"fid": fid.frechet_distance_from_statistics(real["statistics"], fid.feature_statistics(fake_features))}
    if real["features"] is None:
        warn("Warning: a statistics file holds no features: precision/recall need `real` DIR")
        return report
    k = precision_recall.PRC_NEIGHBORHOOD
    if min(len(fake_features), len(real["features"])) > k:
        report.update(precision_recall.precision_recall(fake_features, real["features"]), prc_k=k)
    else:
        warn(f"Warning: precision/recall (k = {k}) need at least {k + 1} images per set; not reported")
    if config.kid:
        report["kid_mean"], report["kid_std"] = fid.kernel_distance(
            real["features"], fake_features, subset_size=config.kid_subset_size, subsets=config.kid_subsets,
            seed=config.seed)
        report["kid_subset_size"], report["kid_subsets"] = config.kid_subset_size, config.kid_subsets
    return report


def _sample_size_warnings(report: dict, dim: int, warn: Callable[[str], None]) -> None:
    """What a reviewer would flag: FID of fewer images than dimensions, or too few for a stable FID."""
    n = min(count for count in (report.get("n_real"), report["n_fake"]) if count is not None)
    name = FD_NAMES[report["features"]]
    if n < dim:
        warn(f"Warning: fewer images than feature dimensions ({dim}); {name} is strongly biased at this size, "
             "compare only numbers computed with the same number of images")
    elif n < STABLE_FID_IMAGES:
        warn(f"Warning: {n} images per set; {name} is biased upward at small n (papers use 50,000): compare only "
             "numbers computed with the same n")
    for label in ("real", "fake"):
        if report.get(f"n_{label}_skipped"):
            warn(f"Warning: skipped {report[f'n_{label}_skipped']} unreadable file(s) in the {label} folder")


def _prepare(config: EvalConfig):
    """Checks that need no model (bad folders or prompts fail before any weights are fetched), then the pack."""
    from ..device import disable_tf32, resolve_device, seed_everything
    from . import images

    validate_config(config)
    if config.kid and config.stats is not None:
        from ..errors import UserInputError

        raise UserInputError("`kid` needs the real images' features: give `real` DIR, not `stats` FILE")
    for folder in (config.real, config.fake):
        if folder is not None:
            images.list_image_files(folder)
    prompts = read_prompts_file(config.prompts) if config.prompts is not None else None
    device = resolve_device(config.device)
    if device.type == "cuda":
        disable_tf32()  # true float32: the same numbers on every GPU
    seed_everything(config.seed)
    pack = None
    if config.features == "clip" or config.prompts is not None:
        from ..packs import load_pack

        pack = load_pack(config.pack, device=device, backend=config.backend, need_mapper=config.prompts is not None,
                         precision=config.precision)
    return prompts, device, pack


def evaluate(config: EvalConfig, warn: Callable[[str], None] = _warn) -> dict:
    """Compute the configured metrics; returns the JSON-able report.

    Keys: `fid` (the Frechet distance in the chosen space, named by `fd_name`), `precision`, `recall`,
    `f_score`, `prc_k`, `features`, `fid_mode`, `resize`, `feature_model`, `feature_weights_sha256`,
    `n_real`, `n_fake`, `n_real_skipped`, `n_fake_skipped`, `real_stats_cached`, `seed`, `versions`, and
    where computed `kid_*`, `clip_score`, `r_precision`, `r_precision_chance`, `score_clip*`,
    `diversity_lpips` (or `diversity_l1` with `diversity_note`), `n_prompts`, `images_per_prompt`,
    `generation_prior`, `generation_precision`, `stats_file`, `saved_stats`. With `save_stats` and no fake set,
    only the real side.
    """
    prompts, device, pack = _prepare(config)
    # The pack's CLIP hashed once: it names the CLIP feature space and tells whether the scoring CLIP is the pack's.
    clip_sha256 = _clip_weights_sha256(pack) if config.features == "clip" else None
    space = _feature_space(config, pack, device, clip_sha256)
    real = _real_set(config, space)
    report = {key: real[key] for key in ("n_real", "n_real_skipped", "real_stats_cached") if key in real}
    report.update(features=config.features, fd_name=FD_NAMES[config.features], fid_mode=space.fid_mode,
                  resize=space.resize, feature_model=space.description, feature_weights_sha256=space.weights_sha256,
                  real=str(config.real) if config.real is not None else None, stats_file=real.get("stats_file"),
                  saved_stats=real.get("saved_stats"), seed=config.seed, device=str(device),
                  versions=package_versions())
    if config.fake is None and config.prompts is None:
        return report  # --save-stats alone
    fake_features, fake_report = _fake_set(config, prompts, pack, space, warn, clip_sha256)
    report.update(fake_report)
    report.update(_distances(config, real, fake_features, warn))
    report.update(n_fake=int(len(fake_features)), feature_dim=int(fake_features.shape[1]),
                  fake=str(config.fake) if config.fake is not None else None,
                  pack=pack.name if pack is not None else None,
                  prompts=str(config.prompts) if config.prompts is not None else None)
    _sample_size_warnings(report, report["feature_dim"], warn)
    return report
