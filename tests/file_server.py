"""A real HTTP file server on 127.0.0.1 (Range support, scripted failures) and registry files for it.

Used through the `server` fixture of conftest.py by the download and reliability tests.
"""
from __future__ import annotations

import hashlib
import http.server
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB: several reads, cheap to hash
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Route:
    body: bytes
    mode: str = "ok"  # ok | drop_once | drop_always | status
    status: int = 200  # for mode "status" (404, 500, ...)
    statuses_then_ok: int = 0  # answer `status` this many times, then serve normally
    seconds: float = 0.0  # spread the body over this long
    gate: threading.Event | None = None  # send half the body, then wait for this before the rest
    hits: int = 0


class FileServer:
    """http.server in a thread: serves registered bodies, honours Range, logs every request."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.first_request = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                server.first_request.set()
                route = server.routes.get(self.path)
                if route is None:
                    return self._status(404)
                route.hits += 1
                if route.mode == "status" and (not route.statuses_then_ok or route.hits <= route.statuses_then_ok):
                    return self._status(route.status)
                body, start = route.body, 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and int(match.group(1)) < len(body):
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                rest = body[start:]
                if route.mode == "drop_always" or (route.mode == "drop_once" and route.hits == 1):
                    # Half of the body, then the connection goes away.
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if route.gate is not None:
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    route.gate.wait(timeout=120)
                    rest = rest[len(rest) // 2:]
                pieces = 8 if route.seconds else 1
                step = -(-len(rest) // pieces)
                for offset in range(0, len(rest), step):
                    self.wfile.write(rest[offset: offset + step])
                    self.wfile.flush()
                    time.sleep(route.seconds / pieces)

            def _status(self, code):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes = PAYLOAD, **options) -> str:
        self.routes[path] = Route(body=body, **options)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def gets(self, path: str) -> list[str | None]:
        """Range headers of the requests made for `path`, in order."""
        return [range_header for requested, range_header in self.requests if requested == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_registry(path: Path, files: dict[str, dict], packs: dict[str, dict] | None = None) -> Path:
    """A registry TOML with the given [files.*] and [packs.*] tables (values as TOML literals)."""
    lines = ["schema = 1", ""]
    for kind, tables in (("files", files), ("packs", packs or {})):
        for name, body in tables.items():
            lines.append(f"[{kind}.{name}]")
            defaults = {"format": "safetensors", "license": "test"} if kind == "files" else {}
            for key, value in {**defaults, **body}.items():
                lines.append(f"{key} = {_toml(value)}")
            lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value) + '"'
