"""A hostile S3 endpoint for tests: what a tenant's own "S3" may do to the operator.

One threaded HTTP server; the bucket (the first path segment, path-style addressing) picks the
behaviour, so one endpoint serves every case:

  drip       200 and headers, then the body one byte every `drip_interval` seconds, without end
  drip-head  the status line, then the headers one byte at a time, without end
  silent     accepts the connection, reads the request, never answers
  huge       200 with an endless body (a listing that never ends)
  huge-5xx   500 with an endless body
  garbage    200 with a body that is not XML
  code-huge      500, a well-formed S3 error whose <Code> is 1 MB long
  code-lines     500, an error whose <Code> and <Message> hold line breaks and a forged log line
  code-controls  500, an error whose <Code> holds C1 controls (an 8-bit CSI) and a bidi override
  message-huge   500, an error whose <Message> is 1 MB of bidi overrides
  status-controls  a status line that is no HTTP status, with terminal escapes in it
  anything else: 404 NoSuchBucket (a small, well-formed answer)

    python -m e2e.localcluster.hostile_s3 --host 127.0.0.1 --port 9999
"""

from __future__ import annotations

import argparse
import socketserver
import threading
import time

CHUNK = b"<Contents>" + b"x" * 4086 + b"</Contents>"
NOT_FOUND = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchBucket</Code>'
             b"<Message>The specified bucket does not exist</Message></Error>")


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        self.request.settimeout(30)
        try:
            head = self._read_head()
            if head is None:
                return
            path = head.split(b" ", 2)[1].decode(errors="replace")
            bucket = path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
            self.server.requests.append(bucket)
            getattr(self, "_" + bucket.replace("-", "_"), self._not_found)()
        except OSError:
            pass

    def _read_head(self) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(4096)
            if not chunk:
                return None
            data += chunk
        return data

    def _forever(self, first: bytes, each: bytes, interval: float) -> None:
        self.request.sendall(first)
        while not self.server.stopping.is_set():
            self.request.sendall(each)
            if interval:
                time.sleep(interval)

    def _drip(self) -> None:
        self._forever(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: 100000000\r\n\r\n", b"<",
                      self.server.drip_interval)

    def _drip_head(self) -> None:
        self._forever(b"HTTP/1.1 200 OK\r\n", b"X", self.server.drip_interval)

    def _silent(self) -> None:
        self.server.stopping.wait()

    def _huge(self) -> None:
        self._forever(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n\r\n<ListBucketResult>", CHUNK, 0)

    def _huge_5xx(self) -> None:
        self._forever(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n\r\n<Error>", CHUNK, 0)

    def _garbage(self) -> None:
        body = b"this is not XML \x00\xff" * 64
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))

    def _error(self, code: str, message: str = "m") -> None:
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
        self.request.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body.encode()), body.encode()))

    def _code_huge(self) -> None:
        self._error("E" * 1_000_000)

    def _code_lines(self) -> None:
        self._error("Slow\nERROR finetune_operator forged line\r\tx", "a\nWARNING forged\n")

    def _code_controls(self) -> None:
        self._error("Slow\u009b31m\u0085\u202eDEVRESER", "\u009b2J")

    def _message_huge(self) -> None:
        self._error("SlowDown", "\u202e" * 330_000)

    def _status_controls(self) -> None:
        self.request.sendall(b"HTTP/1.1 2\x1b[2J\x1b]0;owned\x07 OK\r\nContent-Length: 0\r\n\r\n")

    def _not_found(self) -> None:
        self.request.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(NOT_FOUND), NOT_FOUND))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], drip_interval: float):
        super().__init__(address, _Handler)
        self.drip_interval = drip_interval
        self.stopping = threading.Event()
        self.requests: list[str] = []


class HostileS3:
    """The hostile endpoint on (host, port); port 0 picks a free one. Use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, drip_interval: float = 2.0):
        self.server = _Server((host, port), drip_interval)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[str]:
        return self.server.requests

    def __enter__(self) -> "HostileS3":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e.localcluster.hostile_s3")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--drip-interval", type=float, default=2.0)
    args = parser.parse_args()
    with HostileS3(args.host, args.port, args.drip_interval) as server:
        print(server.endpoint, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
