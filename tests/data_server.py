"""A loopback HTTP server that serves files as DPR's download server does, with Range requests
(206 Partial Content), for the data-source tests and the shell demonstration.

In a test: `with DataServer({"data/x.json.gz": bytes}) as server:` on 127.0.0.1 at a free port;
`server.hold(path, after)` stops a download of `path` after `after` bytes until `release()`,
so a test can kill the client mid-download on a state (the .part file has bytes), not a sleep.

From a shell: `python tests/data_server.py FOLDER [--port N] [--rate BYTES_PER_S]` serves
FOLDER's files, slowly where --rate says, and prints its base URL.
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Mapping

CHUNK = 4096


class DataServer:
    def __init__(self, files: Mapping[str, bytes] | None = None, root: Path | None = None, rate: float | None = None,
                 port: int = 0) -> None:
        self.files = dict(files or {})
        self.ranges = True  # False: answer every request with the whole file (200), as some servers do
        self.root = root
        self.rate = rate
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) of each request
        self._holds: dict[str, int] = {}
        self._released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def hold(self, path: str, after: int) -> None:
        self._holds[path] = after
        self._released.clear()

    def release(self) -> None:
        self._holds.clear()
        self._released.set()

    def content(self, path: str) -> bytes | None:
        if path in self.files:
            return self.files[path]
        if self.root is not None:
            file = (self.root / path).resolve()
            if file.is_file() and self.root.resolve() in file.parents:
                return file.read_bytes()
        return None

    def start(self) -> "DataServer":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "DataServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(server: DataServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet: the tests read server.requests instead
            pass

        def do_GET(self) -> None:
            path = self.path.lstrip("/")
            wanted = self.headers.get("Range")
            server.requests.append((path, wanted))
            body = server.content(path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", wanted or "") if server.ranges else None
            if match:
                start = int(match.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self._send(path, body, start)

        def _send(self, path: str, body: bytes, start: int) -> None:
            hold = server._holds.get(path)
            sent = start
            try:
                while sent < len(body):
                    if hold is not None and sent >= hold:
                        server._released.wait()
                        hold = None
                    end = min(len(body), sent + CHUNK, hold if hold is not None and hold > sent else len(body))
                    self.wfile.write(body[sent:end])
                    self.wfile.flush()
                    sent = end
                    if server.rate:
                        time.sleep(CHUNK / server.rate)  # the shell demo's throttle; tests hold instead
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client was killed mid-download: what the resume test does

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the files to serve, in the mirror's layout (e.g. data/retriever/...)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, help="bytes per second (slow enough to interrupt a download by hand)")
    args = parser.parse_args()
    server = DataServer(root=args.folder, rate=args.rate, port=args.port).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
