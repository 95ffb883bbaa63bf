"""Wall time of `clip2gan --help` and `clip2gan <subcommand> --help` in fresh processes.

Goal: <= 0.3 s median on this machine, which needs the CLI module to import no torch.

    python bench/cli_latency.py            # 10 fresh processes per row
    python bench/cli_latency.py -n 30 --check   # exit 1 if a row misses its goal

Also times a cold `clip2gan generate "a red circle" -n 8` (goal 5 s); more rows go in `extra_rows()`.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    """One timed command line (arguments after `clip2gan`) and its goal in seconds."""

    label: str
    args: tuple[str, ...]
    goal_s: float | None = 0.3
    env: tuple[tuple[str, str], ...] = ()  # extra environment, e.g. (("CLIP2GAN_OFFLINE", "1"),)
    program: tuple[str, ...] | None = None  # None: clip2gan itself


def clip2gan_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m clip2gan_cli`."""
    script = Path(sys.executable).with_name("clip2gan")
    if script.is_file():
        return [str(script)]
    found = shutil.which("clip2gan")
    return [found] if found else [sys.executable, "-m", "clip2gan_cli"]


def subcommands() -> list[str]:
    """The subcommands the Typer app registers (read from the app, so new ones are timed too)."""
    import typer.main

    from clip2gan_cli.cli import app

    return sorted(typer.main.get_command(app).commands)


def baseline_rows() -> list[Row]:
    """An empty interpreter: the floor every row pays (shows how loaded the machine is)."""
    return [Row("python -c pass (baseline)", ("-c", "pass"), goal_s=None, program=(sys.executable,))]


def help_rows() -> list[Row]:
    return [Row("clip2gan --help", ("--help",))] + [
        Row(f"clip2gan {name} --help", (name, "--help")) for name in subcommands()]


def extra_rows() -> list[Row]:
    """Rows beyond --help: a cold `generate` of the default shapes pack, offline, on the CPU (goal 5 s)."""
    out = tempfile.mkdtemp(prefix="clip2gan-latency-")
    return [Row('clip2gan generate "a red circle" -n 8',
                ("generate", "a red circle", "-n", "8", "--out", out, "--device", "cpu"),
                goal_s=5.0, env=(("CLIP2GAN_OFFLINE", "1"),))]


def time_row(row: Row, command: list[str], runs: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds user+sys) of `runs` fresh processes; exits if the command fails.

    CPU time barely moves with machine load, so it tells what wall time would be on an idle machine.
    """
    env = {**os.environ, **dict(row.env)}
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([*(row.program or command), *row.args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"{row.label} failed (exit {done.returncode}): {done.stderr.decode()[-500:]}")
    return walls, cpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=10, help="fresh processes per row (default 10)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a median misses its goal")
    options = parser.parse_args()

    command = clip2gan_command()
    rows = baseline_rows() + help_rows() + extra_rows()
    time_row(rows[1], command, 1)  # warm the OS file cache once so the first row is not penalised
    print(f"command: {' '.join(command)}   runs per row: {options.runs}   python {sys.version.split()[0]}   "
          f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    header = f"{'command':<36} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7} {'goal s':>7}  ok"
    print(header)
    print("-" * len(header))
    missed = 0
    for row in rows:
        times, cpu_times = time_row(row, command, options.runs)
        median = statistics.median(times)
        ok = row.goal_s is None or median <= row.goal_s
        missed += not ok
        goal = f"{row.goal_s:.2f}" if row.goal_s is not None else "-"
        print(f"{row.label:<36} {median:>9.3f} {min(times):>7.3f} {max(times):>7.3f} {statistics.median(cpu_times):>7.3f} {goal:>7}  {'yes' if ok else 'NO'}")
    return 1 if options.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
