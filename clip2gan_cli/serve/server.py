"""The HTTP layer of `clip2gan serve`: the standard library's threading server, JSON in and out.

Routes: GET / (the page), GET /api/model, GET /files/<token>/<name> (a file the app wrote), POST
/api/generate | /api/edit | /api/interpolate | /api/use (JSON), POST /api/upload?name=NAME (the image's
bytes). Every error becomes {"error": one line} with status 400 (bad input) or 500; the server keeps
running.
"""
from __future__ import annotations

import errno
import json
import mimetypes
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import Clip2ganError, UserInputError
from .app import MAX_UPLOAD_BYTES, ServeApp, error_message
from .page import PAGE

PAGE_BYTES = PAGE.encode("utf-8")  # the page never changes while serving: encoded once

MAX_JSON_BYTES = 1024 * 1024
CONTENT_TYPES = {".png": "image/png", ".gif": "image/gif", ".mp4": "video/mp4",
                 ".safetensors": "application/octet-stream"}


class PortInUseError(Clip2ganError):
    """The serve port is taken by another process."""


def make_server(app: ServeApp | None, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """Bind host:port (PortInUseError when taken); `server.app` may be set later (bind before loading models)."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} on {host} is in use", hint="choose another with --port") from None
        raise PortInUseError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    server.daemon_threads = True
    server.app = app
    return server


class Handler(BaseHTTPRequestHandler):
    server_version = "clip2gan-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the terminal shows only the URL and errors
        pass

    # --- responses ---
    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        # the page loads nothing from anywhere but this server
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' blob: data:; "
                         "media-src 'self' blob:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _error(self, error: BaseException) -> None:
        self._json(400 if isinstance(error, Clip2ganError) else 500, {"error": error_message(error)})

    # --- GET ---
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        try:
            if url.path in ("/", "/index.html"):
                self._send(200, PAGE_BYTES, "text/html; charset=utf-8")
            elif url.path == "/api/model":
                self._json(200, self.server.app.model_info())
            elif url.path.startswith("/files/"):
                parts = url.path.split("/")
                path = self.server.app.file(parts[2]) if len(parts) == 4 else None
                if path is None or not path.is_file():
                    self._json(404, {"error": "no such file (it may have been removed: run it again)"})
                    return
                content_type = CONTENT_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] \
                    or "application/octet-stream"
                self._send(200, path.read_bytes(), content_type,
                           {"Content-Disposition": f'inline; filename="{path.name}"'})
            else:
                self._json(404, {"error": "not found"})
        except Exception as error:  # noqa: BLE001 (the server keeps running; the page shows one line)
            self._error(error)

    do_HEAD = do_GET

    # --- POST ---
    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        routes = {"/api/generate": "generate", "/api/edit": "edit", "/api/interpolate": "interpolate"}
        try:
            length = int(self.headers.get("Content-Length") or 0)
            limit = MAX_UPLOAD_BYTES if url.path == "/api/upload" else MAX_JSON_BYTES
            if length < 0 or length > limit:
                self.close_connection = True
                raise UserInputError(f"request of {length:,} bytes is over the {limit // 2**20} MiB limit")
            body = self.rfile.read(length) if length else b""
            app = self.server.app
            if url.path == "/api/upload":
                name = urllib.parse.parse_qs(url.query).get("name", ["upload"])[0]
                self._json(200, app.upload(name, body))
                return
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                raise UserInputError("the request is not JSON") from None
            if not isinstance(request, dict):
                raise UserInputError("the request must be a JSON object")
            if url.path == "/api/use":
                self._json(200, app.use_generated(str(request.get("url", ""))))
            elif url.path in routes:
                self._json(200, getattr(app, routes[url.path])(request))
            else:
                self._json(404, {"error": "not found"})
        except Exception as error:  # noqa: BLE001
            self._error(error)
