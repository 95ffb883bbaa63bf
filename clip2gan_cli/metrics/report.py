"""The eval-fid report: package versions, the terminal table and the atomic JSON write."""
from __future__ import annotations

import os
from pathlib import Path

# Rows of the terminal table: report key -> label (in this order; absent keys are left out).
TABLE_ROWS = (
    ("fid", "FID"), ("precision", "precision (k=3)"), ("recall", "recall (k=3)"),
    ("kid_mean", "KID mean"), ("kid_std", "KID std"), ("clip_score", "CLIP score"),
    ("r_precision", "R-precision"), ("r_precision_chance", "R-precision by chance"),
    ("diversity_lpips", "Diversity (LPIPS)"), ("diversity_l1", "Diversity (pixel L1, LPIPS unavailable)"),
    ("n_real", "real images"), ("n_fake", "fake images"), ("n_real_skipped", "real files skipped"),
    ("n_fake_skipped", "fake files skipped"), ("features", "features"), ("fid_mode", "fid mode"),
    ("resize", "resize"), ("feature_model", "feature model"), ("feature_weights_sha256", "weights sha256"),
    ("score_clip", "scoring CLIP"), ("score_clip_is_generator_clip", "scoring CLIP = generator's CLIP"),
    ("generation_prior", "generation prior"), ("seed", "seed"), ("real_stats_cached", "real stats from cache"),
    ("stats_file", "real statistics file"),
)
# The Frechet distance's name in each feature space.
FD_NAMES = {"inception": "FID", "clip": "FD_CLIP", "dinov2": "FD_DINOv2"}


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (from installed metadata)."""
    from importlib import metadata

    from .. import __version__

    versions = {"clip2gan": __version__}
    for label, distribution in (("torch", "torch"), ("torch-fidelity", "torch-fidelity"), ("clean-fid", "clean-fid"),
                                ("open_clip", "open_clip_torch"), ("lpips", "lpips"), ("timm", "timm")):
        try:
            versions[label] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[label] = "not installed"
    return versions


def _cell(key: str, value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}" if key.startswith("kid") else f"{value:.4f}"
    if key.endswith("sha256"):
        return f"{value[:16]}…"
    return str(value)


def report_table(report: dict):
    """A rich Table of the report's metrics and counts."""
    from rich.table import Table

    fd_name = FD_NAMES.get(report.get("features"), "FID")
    table = Table(title=f"clip2gan eval-fid ({fd_name})", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in TABLE_ROWS:
        if report.get(key) is None:
            continue
        table.add_row(fd_name if key == "fid" else label, _cell(key, report[key]))
    return table


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the report as indented JSON, atomically."""
    import json

    from ..fileutil import atomic_write_text

    return atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")
