"""Benchmark StyleGAN2 synthesis: the ops backends side by side (reference, eager; on CUDA also triton and auto).

    .venv/bin/python bench/generator.py            # 256 and 1024, batch 1 and 8
    .venv/bin/python bench/generator.py --quick    # batch 1 only, fewer repetitions
    .venv/bin/python bench/generator.py --resolutions 256 --batches 1 --reps 5 --dtype float16 --device cuda

Config-f generators with random weights (256: channel_base 16384, 1024: channel_base 32768),
`noise_mode='const'`, no autograd. Speed: all backends run in ONE process on one generator and
take turns every repetition, so machine load hits them alike (the ratio is the number to trust on
a shared machine). On the CPU: reference and eager; with CUDA also triton (the kernels) and auto
(per-op choice by measurement; its first call, which measures, is the untimed warm-up).
Memory: each (case, backend) also runs once in a fresh subprocess; on CPU it reports the peak RSS
during one synthesis (the kernel's peak mark, reset just before the call) and its growth over the
RSS before the call; on CUDA torch.cuda.max_memory_allocated and its growth.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CHANNEL_BASE = {256: 16384, 1024: 32768}  # config-f: paper256 for 256 px, channel_base 32768 at 1024
CPU_BACKENDS = ("reference", "eager")
CUDA_BACKENDS = ("reference", "eager", "triton", "auto")


def _channel_base(resolution: int) -> int:
    return CHANNEL_BASE.get(resolution, 32768 if resolution > 256 else 16384)


def _build(resolution: int, batch: int, device: str, dtype_name: str):
    """Generator (reference backend, seed 0) and a fixed W+ batch on `device` in `dtype`."""
    import torch

    from clip2gan_cli.stylegan2 import build_generator

    dtype = getattr(torch, dtype_name)
    G = build_generator(resolution, channel_base=_channel_base(resolution), backend="reference", seed=0)
    G = G.eval().requires_grad_(False).to(device=device, dtype=dtype)
    z = torch.randn([batch, G.z_dim], generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    with torch.no_grad():
        ws = G.mapping(z)
    return G, ws


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), else the process-lifetime maxrss."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_worker(resolution: int, batch: int, backend: str, device: str, dtype_name: str) -> dict:
    """One synthesis in this (fresh) process; peak memory as seen by the OS or the CUDA allocator."""
    import torch

    G, ws = _build(resolution, batch, device, dtype_name)
    G.set_backend(backend)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            G.synthesis(ws, noise_mode="const")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2 ** 20, "growth_mb": (peak - base) / 2 ** 20}
    rss_before = _rss_mb()
    _reset_peak_rss()  # otherwise the peak could be the model build's, not the synthesis's
    with torch.no_grad():
        G.synthesis(ws, noise_mode="const")
    peak = _peak_rss_mb()
    return {"peak_mb": peak, "growth_mb": max(0.0, peak - rss_before)}


def measure_memory(resolution: int, batch: int, backend: str, device: str, dtype_name: str) -> dict:
    """Run `memory_worker` in a subprocess (maxrss is a per-process high-water mark)."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", f"{resolution},{batch},{backend}",
               "--device", device, "--dtype", dtype_name]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_speed(resolution: int, batch: int, reps: int, device: str, dtype_name: str, backends) -> dict:
    """Seconds per synthesis for each backend, taking turns every repetition (one process)."""
    import torch

    G, ws = _build(resolution, batch, device, dtype_name)
    times = {backend: [] for backend in backends}
    with torch.no_grad():
        outputs = {}
        for backend in backends:  # warm-up (first-call allocations, self-checks, compiles, auto's measuring)
            G.set_backend(backend)
            outputs[backend] = G.synthesis(ws, noise_mode="const").float()
        max_diff = {b: (outputs[b] - outputs["reference"]).abs().max().item() for b in backends}
        ref_max = outputs["reference"].abs().max().item()
        del outputs
        for rep in range(reps):
            order = backends[rep % len(backends):] + backends[:rep % len(backends)]  # rotate who runs first
            for backend in order:
                G.set_backend(backend)
                _sync(device)
                start = time.perf_counter()
                G.synthesis(ws, noise_mode="const")
                _sync(device)
                times[backend].append(time.perf_counter() - start)
    return {"times": times, "max_diff": max_diff, "ref_max": ref_max}


def _format_row(resolution, batch, speed, memory, backends) -> str:
    cells = [f"{resolution:>5d} {batch:>5d}"]
    medians = {}
    for backend in backends:
        median = statistics.median(speed["times"][backend])
        medians[backend] = median
        mem = memory.get(backend, {})
        mem_text = (f"{mem['peak_mb']:7.0f} {mem['growth_mb']:7.0f}" if "peak_mb" in mem
                    else f"{'n/a':>7s} {'n/a':>7s}")
        cells.append(f"{median / batch * 1e3:9.1f} {batch / median:7.2f} {mem_text}")
    mins = {b: min(speed["times"][b]) for b in backends}
    for backend in backends[1:]:
        cells.append(f"{medians['reference'] / medians[backend]:6.2f}x {mins['reference'] / mins[backend]:6.2f}x "
                     f"{speed['max_diff'][backend]:.1e}")
    return " | ".join(cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=lambda s: [int(v) for v in s.split(",")], default=[256, 1024])
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help="comma-separated batch sizes (default 1,8; --quick: 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per backend (default 5; --quick: 3)")
    parser.add_argument("--quick", action="store_true", help="batch 1 only and fewer repetitions")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to PyTorch here")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (TF32 would blur the comparison)
        torch.backends.cuda.matmul.allow_tf32 = False
    elif args.dtype != "float32":
        parser.error("on CPU only --dtype float32 is benchmarked")
    if args.memory_worker:
        resolution, batch, backend = args.memory_worker.split(",")
        print(json.dumps(memory_worker(int(resolution), int(batch), backend, args.device, args.dtype)))
        return 0

    batches = args.batches or ([1] if args.quick else [1, 8])
    reps = args.reps or (3 if args.quick else 5)
    threads = torch.get_num_threads()
    print(f"StyleGAN2 synthesis, config-f, random weights, noise_mode=const, {args.dtype}, device={args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else f" ({threads} threads)")
          + f", torch {torch.__version__}, {reps} alternating reps, median")
    backends = CUDA_BACKENDS if args.device.startswith("cuda") else CPU_BACKENDS
    print("  res batch | " + " | ".join(f"{b:>10s}: ms/img   img/s  peakMB   +MB" for b in backends) + " | "
          + " | ".join(f"{b}: ratio  (min) max|diff|" for b in backends[1:]))
    results = []
    for resolution in args.resolutions:
        for batch in batches:
            speed = measure_speed(resolution, batch, reps, args.device, args.dtype, backends)
            memory = {} if args.no_memory else {
                backend: measure_memory(resolution, batch, backend, args.device, args.dtype) for backend in backends}
            print(_format_row(resolution, batch, speed, memory, backends), flush=True)
            results.append({"resolution": resolution, "batch": batch, "channel_base": _channel_base(resolution),
                            "device": args.device, "dtype": args.dtype, "threads": threads, **speed,
                            "memory": memory})
    print("ratio = reference median / backend median (higher is faster than the reference); "
          "+MB = growth during one call")
    if args.json:
        from clip2gan_cli.fileutil import atomic_write_text
        atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
