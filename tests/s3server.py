"""A real S3 endpoint for tests (moto in server mode on 127.0.0.1) and a fault-injecting proxy.

Use the fixtures from a test module with `from tests.s3server import bucket, s3_server`, or
from every module with `pytest_plugins = ["tests.s3server"]` in conftest.py.

- `s3_server`: one moto server process per test session on a free port (restarted if a test
  stopped it); `.stop()` / `.start()` reuse the port. Moto keeps everything in memory, so a
  stop loses every bucket ("bucket lost", not "outage": use `FaultProxy` for an outage).
- `bucket`: a fresh, uniquely named bucket on that server.
- `FaultProxy`: a TCP proxy in front of the server whose mode switches at runtime:
  "pass", "refuse" (reset connections at once), "hang" (accept, never answer) and "corrupt"
  (flip one byte inside the body of the next N object PUTs / UploadParts).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig

HOST = "127.0.0.1"
REGION = "us-east-1"
DUMMY_KEY_ID = "testing"
DUMMY_SECRET = "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The moto server


class MotoServer:
    """`python -m moto.server` as a child process on a fixed 127.0.0.1 port."""

    def __init__(self, port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30) -> None:
        if self.running:
            return
        deadline = time.monotonic() + timeout
        # The port may linger briefly after a stop: retry the bind a bounded number of times.
        for _attempt in range(20):
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.env},
                )
            if self._wait_ready(deadline):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"moto server did not start:\n{self.log_path.read_text()[-3000:]}")

    def _wait_ready(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def client(self, endpoint_url: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client with the dummy credentials (path-style, as for any IP endpoint)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=DUMMY_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET,
            config=BotoConfig(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                **config,
            ),
        )


_bucket_counter = itertools.count(1)


def unique_bucket_name(label: str = "t") -> str:
    """A valid S3 bucket name (3-63 lowercase letters, digits, hyphens), unique per process."""
    name = f"pacs-{label}-{os.getpid()}-{next(_bucket_counter)}-{os.urandom(3).hex()}"
    return name.lower()[:63].rstrip("-")


@pytest.fixture(scope="session")
def _moto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_server(_moto_process: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The session's moto server, running, with dummy credentials in the environment.

    The developer's own AWS configuration is hidden so that a test never reaches a real
    account and boto3's default chain resolves to the dummy values.
    """
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CA_BUNDLE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _moto_process.start()  # a previous test may have stopped it
    return _moto_process


@pytest.fixture
def bucket(s3_server: MotoServer) -> str:
    name = unique_bucket_name()
    s3_server.client().create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------------------------------------
# The fault proxy

MODES = ("pass", "refuse", "hang", "corrupt")
_MAX_HEADER_BYTES = 64 * 1024
_MAX_CORRUPT_BODY = 256 * 1024**2  # bodies larger than this are passed through untouched
_IO_TIMEOUT_S = 30.0  # an idle proxied connection is dropped after this
_MAX_HANG_S = 120.0  # "hang" holds a connection at most this long


_POLL_S = 0.25  # every blocking socket call returns this often to look at the stop flag


class _Closed(Exception):
    """The peer closed the connection (or it timed out, or the proxy is stopping)."""


def _recv(
    sock: socket.socket, stopping: threading.Event, idle_limit: float = _IO_TIMEOUT_S
) -> bytes:
    """Some bytes from `sock`; _Closed on EOF, error, stop, or `idle_limit` seconds of silence.

    Sockets are polled with a short timeout rather than woken by closing them from another
    thread (closing does not wake a blocked poll() on Linux).
    """
    deadline = time.monotonic() + idle_limit
    while not stopping.is_set() and time.monotonic() < deadline:
        try:
            data = sock.recv(256 * 1024)
        except TimeoutError:
            continue
        except OSError as e:
            raise _Closed() from e
        if not data:
            raise _Closed()
        return data
    raise _Closed()


def _send(sock: socket.socket, data: bytes | bytearray, stopping: threading.Event) -> None:
    """All of `data`, or _Closed on error, stop, or _IO_TIMEOUT_S without progress."""
    view = memoryview(data)
    deadline = time.monotonic() + _IO_TIMEOUT_S
    while view:
        if stopping.is_set() or time.monotonic() > deadline:
            raise _Closed()
        try:
            sent = sock.send(view)
        except TimeoutError:
            continue
        except OSError as e:
            raise _Closed() from e
        view = view[sent:]
        deadline = time.monotonic() + _IO_TIMEOUT_S


class _Reader:
    """Buffered reads from a socket with a bounded buffer."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.stopping = stopping

    def _fill(self) -> None:
        self.buf += _recv(self.sock, self.stopping)

    def send(self, sink: socket.socket, data: bytes | bytearray) -> None:
        _send(sink, data, self.stopping)

    def until(self, marker: bytes, limit: int) -> bytes:
        while (end := self.buf.find(marker)) < 0:
            if len(self.buf) > limit:
                raise _Closed()
            self._fill()
        end += len(marker)
        data = bytes(self.buf[:end])
        del self.buf[:end]
        return data

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def stream(self, n: int, sink: socket.socket) -> None:
        """Forward exactly n bytes without holding them all."""
        while n > 0:
            if not self.buf:
                self._fill()
            take = min(n, len(self.buf))
            self.send(sink, self.buf[:take])
            del self.buf[:take]
            n -= take


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of an HTTP server, with switchable faults.

    The mode is read at each new connection and at each new request on a kept-alive one, so
    a switch applies to botocore's pooled connections too.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._mode = "pass"
        self._corrupt_left = 0
        self.corrupted = 0  # how many request bodies were corrupted so far
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    def set_mode(self, mode: str, count: int = 1) -> None:
        """Switch the fault; for "corrupt", `count` request bodies are corrupted, then "pass"."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        with self._lock:
            self._mode = mode
            self._corrupt_left = count if mode == "corrupt" else 0

    def close(self) -> None:
        """Stop accepting, drop every connection and wait (bounded) for the threads to end."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self._lock:
                sockets = list(self._sockets)
                alive = [t for t in self._threads if t.is_alive()]
            for s in sockets:
                _close(s)
            if not alive:
                return
            alive[0].join(0.1)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            if not self._stopping.is_set():
                self._sockets.add(sock)
                return sock
        _close(sock)
        raise OSError("the proxy is closing")

    def _untrack(self, *socks: socket.socket) -> None:
        for s in socks:
            _close(s)
            with self._lock:
                self._sockets.discard(s)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._spawn(self._serve, self._track(client))
            except OSError:
                return

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(_POLL_S)
        mode = self.mode
        if mode == "refuse":
            _reset(client)
            self._untrack(client)
            return
        if mode == "hang":
            self._hang(client)
            return
        try:
            upstream = self._track(socket.create_connection((HOST, self.upstream_port), 5))
        except OSError:
            _reset(client)
            self._untrack(client)
            return
        upstream.settimeout(_POLL_S)
        self._spawn(self._pump_raw, upstream, client)
        try:
            self._pump_requests(client, upstream)
        finally:
            self._untrack(client, upstream)

    def _hang(self, client: socket.socket) -> None:
        """Read and discard whatever comes, never answer; bounded by _MAX_HANG_S."""
        try:
            self._discard(client)
        finally:
            self._untrack(client)

    def _discard(self, sock: socket.socket) -> None:
        deadline = time.monotonic() + _MAX_HANG_S
        with contextlib.suppress(_Closed):
            while time.monotonic() < deadline:
                _recv(sock, self._stopping, idle_limit=deadline - time.monotonic())

    def _pump_raw(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                _send(sink, _recv(source, self._stopping), self._stopping)
        except _Closed:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _pump_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Forward HTTP/1.1 requests one by one, applying the mode at each request start."""
        reader = _Reader(client, self._stopping)
        try:
            while not self._stopping.is_set():
                head = reader.until(b"\r\n\r\n", _MAX_HEADER_BYTES)
                mode = self.mode
                if mode == "refuse":
                    _reset(client)
                    return
                if mode == "hang":
                    self._discard(client)
                    return
                request = _parse_head(head)
                reader.send(upstream, head)
                corrupt = mode == "corrupt" and request.is_object_upload and self._take()
                self._forward_body(reader, upstream, request, corrupt)
        except _Closed:
            return
        except OSError:
            return

    def _take(self) -> bool:
        with self._lock:
            if self._corrupt_left <= 0:
                return False
            self._corrupt_left -= 1
            if self._corrupt_left == 0:
                self._mode = "pass"
            self.corrupted += 1
            return True

    def _forward_body(
        self, reader: _Reader, upstream: socket.socket, request: _Request, corrupt: bool
    ) -> None:
        if request.chunked:
            _forward_chunked(reader, upstream, corrupt)
        elif corrupt and 0 < request.content_length <= _MAX_CORRUPT_BODY:
            body = bytearray(reader.exact(request.content_length))
            position = _aws_chunked_data_middle(body) if request.aws_chunked else len(body) // 2
            body[position] ^= 0xFF
            reader.send(upstream, body)
        else:
            reader.stream(request.content_length, upstream)


class _Request:
    def __init__(self, method: str, target: str, headers: dict[str, str]) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        encoding = headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in encoding
        self.content_length = 0 if self.chunked else int(headers.get("content-length", "0"))
        self.aws_chunked = "aws-chunked" in headers.get(
            "content-encoding", ""
        ).lower() or headers.get("x-amz-content-sha256", "").startswith("STREAMING-")

    @property
    def is_object_upload(self) -> bool:
        """PutObject or UploadPart (path-style /bucket/key), not a copy or a bucket call."""
        path, _, query = self.target.partition("?")
        segments = [s for s in path.split("/") if s]
        has_body = self.chunked or self.content_length > 0
        return (
            self.method == "PUT"
            and has_body
            and len(segments) >= 2
            and "x-amz-copy-source" not in self.headers
            and (not query or "partNumber=" in query)
        )


def _parse_head(head: bytes) -> _Request:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 3:
        raise _Closed()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return _Request(parts[0], parts[1], headers)


def _forward_chunked(reader: _Reader, upstream: socket.socket, corrupt: bool) -> None:
    """Forward a chunked body chunk by chunk; flip a byte in the middle of the first data."""
    for _ in range(10_000_000):  # bounded: a body has at most this many chunks
        size_line = reader.until(b"\r\n", 4096)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        reader.send(upstream, size_line)
        if size == 0:
            # Trailers (possibly none), then the final empty line.
            while (line := reader.until(b"\r\n", _MAX_HEADER_BYTES)) != b"\r\n":
                reader.send(upstream, line)
            reader.send(upstream, b"\r\n")
            return
        if corrupt and size <= _MAX_CORRUPT_BODY:
            data = bytearray(reader.exact(size))
            data[size // 2] ^= 0xFF
            reader.send(upstream, data)
            corrupt = False
        else:
            reader.stream(size, upstream)
        reader.send(upstream, reader.exact(2))  # CRLF after the data


def _aws_chunked_data_middle(body: bytearray) -> int:
    """The middle of the first data chunk of an aws-chunked body (hex;chunk-signature=...)."""
    line_end = body.find(b"\r\n")
    if line_end < 0:
        return len(body) // 2
    try:
        size = int(bytes(body[:line_end]).split(b";")[0], 16)
    except ValueError:
        return len(body) // 2
    start = line_end + 2
    return start + size // 2 if size and start + size <= len(body) else len(body) // 2


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a refused or dropped connection looks to the client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()  # no shutdown() first: that would send a polite FIN


def _close(sock: socket.socket) -> None:
    # shutdown() first: it wakes a thread blocked in recv() on this socket; close() alone
    # does not.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@pytest.fixture
def fault_proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.port) as proxy:
        yield proxy
