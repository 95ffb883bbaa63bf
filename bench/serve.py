"""Server time per request of `clip2gan serve` with the shapes pack, warm, side by side with the bare
library call it wraps.

Goals (issue 18, shapes pack on 2 CPU cores, warm): an edit re-render (a new beta on the same image)
<= 60 ms; generate 8 images <= 150 ms. Rows:
  pipeline  the library call alone (pipeline.edit with the cached inversion / pipeline.generate)
  app       ServeApp's handler: the call + writing the CLI's files (what the server spends)
  http      the handler through the local HTTP server, as the page sends it (client in this process)
Every row runs each request in a fresh thread, as the server does.

    python bench/serve.py                 # 30 timed requests per row after 5 warm-up ones
    python bench/serve.py -n 60 --check   # exit 1 when a row of the server misses its goal
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request

GOALS_MS = {"edit re-render": 60.0, "generate 8 images": 150.0}


def in_new_thread(call, index: int) -> None:
    """Run call(index) in a fresh thread, as the server runs each request (ThreadingHTTPServer): on a loaded
    machine, 2-thread torch calls in the main thread measured 10-30x slower than in a fresh thread."""
    errors = []
    worker = threading.Thread(target=lambda: _capture(call, index, errors))
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def _capture(call, index, errors) -> None:
    try:
        call(index)
    except Exception as error:  # noqa: BLE001 (re-raised in the caller's thread)
        errors.append(error)


def timed(call, repeats: int, warmup: int) -> list[float]:
    for index in range(warmup):
        in_new_thread(call, index)
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        in_new_thread(call, warmup + index)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="timed requests per row")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the goal is for 2 cores)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a server row misses its goal")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from clip2gan_cli import imageio, pipeline
    from clip2gan_cli.packs import load_pack
    from clip2gan_cli.serve.app import ModelSpec, ServeApp, make_workdir
    from clip2gan_cli.serve.server import make_server

    models = load_pack("shapes", device="cpu")
    workdir = make_workdir()  # where `clip2gan serve` writes
    app = ServeApp(models=models, spec=ModelSpec(), workdir=workdir)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def http(path: str, payload: dict) -> dict:
        request = urllib.request.Request(base + path, data=json.dumps(payload).encode(), method="POST")
        with urllib.request.urlopen(request) as response:
            return json.load(response)

    source_url = app.generate({"prompts": "a red circle", "n": 1, "seed": 0})["images"][0]["url"]
    image = app.use_generated(source_url)
    defaults = app.edit_defaults()
    layers = defaults["layers"]
    edit_request = lambda beta: {"image": image["image"], "edits": [{"text": "blue", "beta": beta}],  # noqa: E731
                                 "neutral": defaults["neutral"], "direction": defaults["direction"],
                                 "layers": imageio.layers_label(layers)}
    beta = lambda index: round(-2 + (index % 80) * 0.05, 2)  # noqa: E731  a slider sweep: every request new
    source = app._images[image["image"]]
    generate_request = lambda index: {"prompts": "a red circle", "n": 8, "seed": index}  # noqa: E731

    rows = {
        "edit re-render": {
            "pipeline": lambda i: pipeline.edit(models.generator, models.clip, models.mapper, source.tensor,
                                                [("blue", beta(i))], neutral=defaults["neutral"], w_plus=source.w_plus,
                                                direction=defaults["direction"], layers=layers),
            "app": lambda i: app.edit(edit_request(beta(i))),
            "http": lambda i: http("/api/edit", edit_request(beta(i))),
        },
        "generate 8 images": {
            "pipeline": lambda i: pipeline.generate(models.generator, models.clip, models.mapper, ["a red circle"],
                                                    n=8, seed=i),
            "app": lambda i: app.generate(generate_request(i)),
            "http": lambda i: http("/api/generate", generate_request(i)),
        },
    }
    print(f"clip2gan serve, shapes pack, torch threads {args.threads}, {args.n} requests per row "
          f"(+{args.warmup} warm-up); ms")
    print(f"{'request':<20}{'row':<10}{'median':>8}{'p90':>8}{'min':>8}{'goal':>7}{'median/goal':>13}"
          f"{'x pipeline':>12}")
    missed = False
    for name, calls in rows.items():
        medians = {}
        for row, call in calls.items():
            times = sorted(timed(call, args.n, args.warmup))
            median = statistics.median(times)
            medians[row] = median
            goal = GOALS_MS[name] if row != "pipeline" else None
            missed |= goal is not None and median > goal
            print(f"{name:<20}{row:<10}{median:>8.1f}{times[int(0.9 * (len(times) - 1))]:>8.1f}{times[0]:>8.1f}"
                  f"{goal if goal else '':>7}{(f'{median / goal:.2f}' if goal else ''):>13}"
                  f"{median / medians['pipeline']:>12.2f}")
    server.shutdown()
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
