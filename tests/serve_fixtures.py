"""Shared by tests/test_serve*.py: a ServeApp on a real local HTTP server, and JSON calls (the `served` fixture is in conftest.py)."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager


@contextmanager
def running_server(app):
    """`app` served on 127.0.0.1 at a free port in a thread; yields the base URL."""
    from clip2gan_cli.serve.server import make_server

    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def post(base: str, path: str, payload=None, raw: bytes | None = None) -> tuple[int, dict]:
    """POST JSON (or raw bytes) and return (status, decoded JSON answer)."""
    data = raw if raw is not None else json.dumps(payload or {}).encode("utf-8")
    request = urllib.request.Request(base + path, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def get(base: str, path: str) -> tuple[int, bytes, dict]:
    """GET: (status, body, headers)."""
    try:
        with urllib.request.urlopen(base + path, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)
