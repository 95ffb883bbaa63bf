"""The GPU table: synthesis speed, memory and accuracy for every backend x precision, and a training step.

    python bench/gpu_table.py                      # on CUDA: 256 and 1024 px, batch 1/8/32, 1024 px train step
    python bench/gpu_table.py --smoke              # on the CPU at tiny sizes: proves the script runs

Synthesis: config-f generators (256: channel_base 16384, 1024: 32768) with NVIDIA's training
settings num_fp16_res=4 and conv_clamp=256, random weights (seed 0), noise_mode 'const', no
autograd. For each resolution and batch, the reference backend in float32 (TF32 off) is the
reference image; every backend (the ops package's list, plus 'auto') x precision (fp32, fp16, bf16:
`set_precision`, so the marked blocks run reduced and the rest float32) reports images/s (timed
after one warm-up call), peak memory (CUDA: max_memory_allocated) and max|img - reference|.
A row whose deviation exceeds its precision's bound, or that is not finite, is a MISMATCH: the
table is printed, then the exit status is 1 (as for a failed training run; out of memory is shown,
not failed). The bounds catch broken kernels (errors of order 1), not float rounding: fp32 1e-4,
fp16 2e-2, bf16 1e-1, each times max(1, max|reference|).

Training step: bench/train.py's full-size run (config-f G+D, ViT-B-16 CLIP, default losses) at
batch 1 and 2, each in a fresh process, with and without block checkpointing: s/step and the
memory per additional sample.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from clip2gan_cli.device import PRECISIONS

BOUNDS = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}  # max|img - ref| / max(1, max|ref|) above which a row fails
CHANNEL_BASE = {256: 16384}  # config-f paper256 at 256 px; 32768 elsewhere
SMOKE = dict(resolutions=[16, 32], batches=[1, 2], channel_base=512, channel_max=32, train_resolution=32,
             min_time=0.0, device="cpu")


def backend_names() -> list[str]:
    """The ops package's backends, then 'auto'."""
    from clip2gan_cli.stylegan2 import ops

    return list(ops.BACKENDS) + ["auto"]


def auto_choices() -> str:
    """What 'auto' resolved to, and on CUDA how often it chose each backend per op (measured calls)."""
    from collections import Counter

    from clip2gan_cli.stylegan2 import ops
    from clip2gan_cli.stylegan2.ops import autotune

    text = f"auto -> {ops.resolve_backend('auto')}"
    counts = Counter((json.loads(key)["op"], backend) for key, backend in autotune.choices().items())
    if counts:
        chosen = (f"{op} {backend} x{n}" for (op, backend), n in sorted(counts.items()))
        text += "; per op and shape: " + ", ".join(chosen)
    return text


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_synthesis(G, ws, device, min_time: float, max_reps: int) -> float:
    """Images per second: one warm-up call, then repetitions until min_time has passed (at least one)."""
    import torch

    with torch.no_grad():
        G.synthesis(ws)
        sync(device)
        reps, started = 0, time.perf_counter()
        while True:
            G.synthesis(ws)
            reps += 1
            sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= min_time or reps >= max_reps:
                return reps * ws.shape[0] / elapsed


def synthesis_rows(args) -> tuple[list[dict], list[str]]:
    import torch

    from clip2gan_cli.device import disable_tf32, resolve_device
    from clip2gan_cli.errors import DeviceError
    from clip2gan_cli.stylegan2.networks import build_generator
    from clip2gan_cli.stylegan2.ops import resolve_backend

    device = resolve_device(args.device)
    disable_tf32()
    rows, notes = [], []
    for resolution in args.resolutions:
        channel_base = args.channel_base or CHANNEL_BASE.get(resolution, 32768)
        G = build_generator(resolution, channel_base=channel_base, channel_max=args.channel_max, conv_clamp=256,
                            num_fp16_res=4, backend="reference", seed=0)
        G = G.eval().requires_grad_(False).to(device)
        for batch in args.batches:
            z = torch.randn([batch, G.z_dim], generator=torch.Generator().manual_seed(1)).to(device)
            with torch.no_grad():
                ws = G.mapping(z)
                G.set_backend("reference").set_precision("fp32")
                reference = G.synthesis(ws).float()
            scale = max(1.0, reference.abs().max().item())
            for backend in args.backends:
                try:
                    resolved = resolve_backend(backend)
                except DeviceError as error:
                    notes.append(f"{backend}: skipped ({error})")
                    continue
                G.set_backend(backend)
                for precision in args.precisions:
                    row = {"res": resolution, "batch": batch, "backend": backend if backend != "auto"
                           else f"auto={resolved}", "precision": precision}
                    try:
                        G.set_precision(precision)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats(device)
                        with torch.no_grad():
                            image = G.synthesis(ws).float()
                        row["peak_gb"] = (torch.cuda.max_memory_allocated(device) / 1e9
                                          if device.type == "cuda" else float("nan"))
                        row["images_per_s"] = time_synthesis(G, ws, device, args.min_time, args.max_reps)
                    except DeviceError as error:  # e.g. bf16 on a GPU without it
                        notes.append(f"{backend} {precision}: skipped ({error})")
                        continue
                    except torch.OutOfMemoryError:
                        row.update(images_per_s=float("nan"), peak_gb=float("nan"), deviation=float("nan"),
                                   status="out of memory")
                        rows.append(row)
                        torch.cuda.empty_cache()
                        continue
                    deviation = (image - reference).abs().max().item()
                    finite = bool(torch.isfinite(image).all())
                    row["deviation"] = deviation
                    row["status"] = "ok" if finite and deviation <= BOUNDS[precision] * scale else "MISMATCH"
                    rows.append(row)
                    print(format_row(row), flush=True)
        del G
    notes.append(auto_choices())
    return rows, notes


def train_rows(args) -> list[dict]:
    """bench/train.py's full-size child runs: (checkpointing, batch) each in a fresh process."""
    rows = []
    for checkpointing in ("off", "on"):
        runs = {}
        for batch in (1, 2):
            command = [sys.executable, str(Path(__file__).with_name("train.py")), "--one-run",
                       "--resolution", str(args.train_resolution), "--batch-size", str(batch),
                       "--checkpointing", checkpointing, "--device", args.device, "--steps", "1"]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                rows.append({"checkpointing": checkpointing, "status": f"FAILED (batch {batch}): {tail}"})
                break
            runs[batch] = json.loads(lines[-1])
        else:
            rows.append({"checkpointing": checkpointing, "status": "ok",
                         "s_per_step": [runs[1]["s_per_step"], runs[2]["s_per_step"]],
                         "gb": [runs[1]["peak_gib"] * 2 ** 30 / 1e9, runs[2]["peak_gib"] * 2 ** 30 / 1e9]})
    return rows


def format_row(row: dict) -> str:
    peak = "-" if row["peak_gb"] != row["peak_gb"] else f"{row['peak_gb']:.2f}"  # nan: not measured (CPU)
    return (f"{row['res']:>5} {row['batch']:>5}  {row['backend']:<16}{row['precision']:<6}"
            f"{row['images_per_s']:>10.1f}{peak:>9}{row['deviation']:>11.2e}  {row['status']}")


def print_table(rows, notes, train, args) -> None:
    print()
    print(f"== synthesis: config-f, num_fp16_res 4, conv_clamp 256, noise const, no grad; device {args.device}")
    print(f"{'res':>5} {'batch':>5}  {'backend':<16}{'prec':<6}{'img/s':>10}{'peak GB':>9}{'max|dev|':>11}  status")
    for row in rows:
        print(format_row(row))
    for note in notes:
        print(f"  {note}")
    if train:
        print(f"== training step at {args.train_resolution} px (config-f G+D, ViT-B-16 CLIP, default losses, fp32)")
        print(f"{'checkpointing':<15}{'s/step b1':>10}{'s/step b2':>10}{'GB b1':>8}{'GB b2':>8}{'GB/sample':>11}")
        for row in train:
            if row["status"] != "ok":
                print(f"{row['checkpointing']:<15}{row['status']}")
                continue
            (s1, s2), (g1, g2) = row["s_per_step"], row["gb"]
            print(f"{row['checkpointing']:<15}{s1:>10.2f}{s2:>10.2f}{g1:>8.2f}{g2:>8.2f}{g2 - g1:>11.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script, not speed)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend of the ops package + auto")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--channel-base", type=int, default=0, help="0: config-f's")
    parser.add_argument("--channel-max", type=int, default=512)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed repetitions per row")
    parser.add_argument("--max-reps", type=int, default=20)
    parser.add_argument("--train-resolution", type=int, default=None,
                        help="training-step rows at this size (default 1024, --smoke 32; 0: none)")
    args = parser.parse_args()
    explicit_train = args.train_resolution
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if explicit_train is not None:
        args.train_resolution = explicit_train
    elif not args.smoke:
        args.train_resolution = 1024
    args.backends = args.backends or backend_names()
    rows, notes = synthesis_rows(args)
    train = train_rows(args) if args.train_resolution else []
    print_table(rows, notes, train, args)
    failures = [row for row in rows if row["status"] == "MISMATCH"] + [row for row in train if row["status"] != "ok"]
    print(f"gpu_table: {'FAIL' if failures else 'PASS'} ({len(failures)} failing row(s) of {len(rows) + len(train)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
