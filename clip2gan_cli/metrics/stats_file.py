"""Precomputed real-set statistics: `eval-fid --save-stats FILE` writes them, `--stats FILE` reads them.

The file is an npz with `mu`, `sigma` and `mode` (the resize convention they were made in:
legacy or clean, or "none" for the CLIP space, which has its own preprocessing), and, when this
tool wrote it, `features`, `feature_model`, `feature_weights_sha256`, `resize`, `n_images` and
`n_skipped`. Comparing against statistics of another mode, feature kind or extractor weights is
an error: the numbers would not be comparable.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserInputError
from ..fileutil import atomic_savez
from .feature_spaces import FeatureSpace

NO_MODE = "none"  # the mode of CLIP-space statistics: the CLIP's own preprocessing


def space_mode(space: FeatureSpace) -> str:
    return space.fid_mode or NO_MODE


def save_statistics(path: str | os.PathLike, statistics: dict, space: FeatureSpace, n_images: int,
                    n_skipped: int = 0) -> Path:
    """Write mu, sigma, the mode and the extractor's identity to `path` (atomically)."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"statistics file {path} is a folder")
    return atomic_savez(path, mu=statistics["mu"], sigma=statistics["sigma"], mode=np.str_(space_mode(space)),
                        features=np.str_(space.name), feature_model=np.str_(space.description),
                        feature_weights_sha256=np.str_(space.weights_sha256), resize=np.str_(space.resize),
                        n_images=n_images, n_skipped=n_skipped)


def load_statistics(path: str | os.PathLike) -> dict:
    """{'mu', 'sigma', 'mode', ...} of a statistics file; UserInputError for a missing or malformed one."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"statistics file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            loaded = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise UserInputError(f"statistics file {path} is not an npz archive ({error})") from error
    missing = [key for key in ("mu", "sigma", "mode") if key not in loaded]
    if missing:
        raise UserInputError(f"statistics file {path} lacks {', '.join(missing)}",
                             hint="expected an npz with mu, sigma and mode (eval-fid `save_stats` writes one)")
    mu, sigma = loaded["mu"], loaded["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not np.isfinite(sigma).all():
        raise UserInputError(f"statistics file {path}: mu {mu.shape} and sigma {sigma.shape} do not form a Gaussian")
    result = {key: (value.item() if value.ndim == 0 else value) for key, value in loaded.items()}
    result.update(mu=mu, sigma=sigma, mode=str(loaded["mode"]))
    return result


def check_statistics_match(stats: dict, space: FeatureSpace, path: str | os.PathLike) -> None:
    """UserInputError when the statistics were made in another mode, feature kind, extractor or dimension."""
    mode = space_mode(space)
    if stats["mode"] != mode:
        hint = "use `features` clip" if stats["mode"] == NO_MODE else f"use `fid_mode` {stats['mode']}"
        raise UserInputError(f"statistics file {path} was made in mode {stats['mode']}; this run uses {mode}",
                             hint=f"{hint}, or statistics made in {mode}")
    for key, ours in (("features", space.name), ("feature_weights_sha256", space.weights_sha256)):
        if key in stats and str(stats[key]) != ours:
            raise UserInputError(f"statistics file {path} has {key} {str(stats[key])[:16]}; this run uses {ours[:16]}")
