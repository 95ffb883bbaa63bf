"""The `clip2gan serve` command (registered by cli.py; imports typer only until it runs)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..device import DEVICE_CHOICES, PRECISION_CHOICES


def serve_command(
    pack: Optional[str] = typer.Option(None, "--pack", help="Pack name (default: the builtin 'shapes')."),
    mapper: Optional[Path] = typer.Option(None, "--mapper", help="Mapper file (with --generator and --clip)."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Generator: registry name or file."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP: MODEL:TAG, MODEL:FILE, or a clip_config.json."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(7860, "--port", help="Port to listen on."),
    device: str = typer.Option("auto", "--device", help=f"Where models run: {DEVICE_CHOICES}."),
    backend: str = typer.Option("auto", "--backend", help="StyleGAN2 ops: auto | eager | triton | reference (fused: old name of eager)."),
    precision: str = typer.Option("auto", "--precision", metavar="|".join(PRECISION_CHOICES),
                                  help="What the generator's float16-marked blocks run in (as for generate)."),
) -> None:
    """Serve a local web page to generate, edit (live beta sliders) and interpolate; Ctrl-C stops it."""
    import shutil

    from ..device import resolve_device
    from ..errors import UserInputError
    from ..packs import select_models
    from .app import ModelSpec, ServeApp, make_workdir
    from .server import make_server

    if not 0 <= port <= 65535:
        raise UserInputError(f"--port must be between 0 and 65535, got {port}")
    precision = precision.lower()
    if precision not in PRECISION_CHOICES:
        raise UserInputError(f"unknown --precision '{precision}'", hint=f"expected {' | '.join(PRECISION_CHOICES)}")
    server = make_server(None, host, port)  # a taken port fails before any model loads
    workdir = make_workdir()
    try:
        models = select_models(pack, mapper, generator, clip, resolve_device(device), backend, precision=precision)
        spec = ModelSpec(pack=pack, mapper=str(mapper) if mapper else None, generator=generator, clip=clip,
                         device=device, backend=backend, precision=precision)
        server.app = ServeApp(models=models, spec=spec, workdir=workdir)
        bound_host, bound_port = server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        typer.echo(f"clip2gan serve: http://{shown}:{bound_port}/  (pack {models.name}; Ctrl-C stops)", err=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            typer.echo(f"Warning: listening on {host}: other machines can reach this page.", err=True)
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        shutil.rmtree(workdir, ignore_errors=True)
