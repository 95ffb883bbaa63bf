"""Are two shapes-pack builds the same? File by file: identical bytes, or else identical tensors (bit for
bit, same dtype and shape) and identical metadata once wall-clock fields are dropped.

Wall-clock fields are the only thing two runs of the same build may differ in: the stage seconds in
build_times.json and the "seconds" of the GAN progress stored in generator/discriminator metadata.

    python bench/pack_equality.py PACK_A PACK_B [--work WORK_A WORK_B]

--work also compares each build's mapper run config (mapper_run/config.toml, the resolved TrainConfig)
byte for byte once each build's own work and pack paths are written as WORK and PACK. Exit status 0
when everything matches, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WALL_CLOCK_KEYS = {"seconds", "stage_seconds", "total_seconds"}


def without_wall_clock(value):
    """`value` (parsed JSON) with every wall-clock key removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def parsed_metadata(metadata: dict[str, str]) -> dict:
    """safetensors metadata with JSON values parsed (so key order inside them does not count)."""
    parsed = {}
    for key, text in metadata.items():
        try:
            parsed[key] = json.loads(text)
        except ValueError:
            parsed[key] = text
    return without_wall_clock(parsed)


def compare_safetensors(a: Path, b: Path) -> str | None:
    """None when the tensors are bit-identical and the metadata equal minus wall clock; else what differs."""
    import torch
    from safetensors import safe_open

    def raw(tensor):  # the bytes themselves: -0.0 vs 0.0 and NaN payloads count
        return tensor.reshape(-1).contiguous().view(torch.uint8)

    with safe_open(str(a), "pt") as left, safe_open(str(b), "pt") as right:
        if set(left.keys()) != set(right.keys()):
            return f"tensor names differ: {sorted(set(left.keys()) ^ set(right.keys()))[:5]}"
        for name in left.keys():
            x, y = left.get_tensor(name), right.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(raw(x), raw(y)):
                return f"tensor {name} differs"
        if parsed_metadata(left.metadata() or {}) != parsed_metadata(right.metadata() or {}):
            return "metadata differs (beyond wall-clock fields)"
    return None


def compare_file(a: Path, b: Path) -> tuple[str, str | None]:
    """(how they match, or None with the difference)."""
    if a.read_bytes() == b.read_bytes():
        return "identical bytes", None
    if a.suffix == ".safetensors":
        problem = compare_safetensors(a, b)
        return ("same tensors, same metadata minus wall clock", None) if problem is None else ("DIFFERENT", problem)
    if a.suffix == ".json":
        same = without_wall_clock(json.loads(a.read_text())) == without_wall_clock(json.loads(b.read_text()))
        return ("same JSON minus wall clock", None) if same else ("DIFFERENT", "JSON content differs")
    return "DIFFERENT", "bytes differ"


def compare_run_configs(a: Path, b: Path, roots_a: tuple[Path, Path], roots_b: tuple[Path, Path]) -> str | None:
    """None when two config.toml files are the same text once each names its own (work, pack) as WORK, PACK."""
    def text(path: Path, work: Path, pack: Path) -> str:
        return path.read_text().replace(str(work), "WORK").replace(str(pack), "PACK")

    return None if text(a, *roots_a) == text(b, *roots_b) else "configs differ beyond the build's own paths"


def compare_builds(pack_a: Path, pack_b: Path, work: tuple[Path, Path] | None = None) -> list[tuple[str, str, str | None]]:
    """(file, verdict, problem) for every file of either pack (and the mapper run configs with `work`)."""
    def files(pack: Path) -> set[str]:  # files only: a folder such as __pycache__ is no part of the pack
        return {p.name for p in pack.iterdir() if p.is_file()}

    pairs = [(name, pack_a / name, pack_b / name) for name in sorted(files(pack_a) | files(pack_b))]
    rows = []
    for name, a, b in pairs:
        if not (a.is_file() and b.is_file()):
            rows.append((name, "MISSING", f"only in {a.parent if a.is_file() else b.parent}"))
            continue
        verdict, problem = compare_file(a, b)
        rows.append((name, verdict, problem))
    if work is not None:
        problem = compare_run_configs(work[0] / "mapper_run" / "config.toml", work[1] / "mapper_run" / "config.toml",
                                      (work[0], pack_a), (work[1], pack_b))
        rows.append(("mapper_run/config.toml", "same text but for WORK/PACK" if problem is None else "DIFFERENT",
                     problem))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pack_a", type=Path)
    parser.add_argument("pack_b", type=Path)
    parser.add_argument("--work", type=Path, nargs=2, metavar=("WORK_A", "WORK_B"))
    args = parser.parse_args(argv)
    rows = compare_builds(args.pack_a, args.pack_b, tuple(args.work) if args.work else None)
    for name, verdict, problem in rows:
        print(f"{name:28s} {verdict}" + (f": {problem}" if problem else ""))
    return 1 if any(problem for _, _, problem in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
