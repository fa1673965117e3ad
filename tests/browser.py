"""Headless-Chromium page checks over the Chrome DevTools Protocol, Python standard library only.

``open_page(path)`` starts ``chromium --headless`` with a fresh temporary profile and
``--remote-debugging-port=0``, reads the browser's DevTools websocket address, opens a tab
(``Target.createTarget`` + ``Target.attachToTarget`` with ``flatten``, so one websocket carries
everything), enables the Runtime/Log/Page/Network domains, navigates to ``file://<path>`` and waits
for the load event plus a short settle.  Console errors (``Runtime.consoleAPICalled`` of type
error/assert), uncaught exceptions (``Runtime.exceptionThrown``), ``Log.entryAdded`` of level error
and failed resource loads (``Network.loadingFailed``) are collected in ``PageResult.errors``;
``PageResult.evaluate(js)`` runs JavaScript in the page and returns its JSON value.  The browser
process group and the profile directory are removed on exit, also on failure.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome",
                       "google-chrome-stable")

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps",
    "--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
    "--window-size=1280,1024",
)

_WS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    """Chromium could not be started, or the DevTools connection failed or timed out."""


class JSError(RuntimeError):
    """``PageResult.evaluate`` threw in the page."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable (``$MDIFF_CHROMIUM`` first), or None."""
    env = os.environ.get("MDIFF_CHROMIUM")
    for cand in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        if os.path.isabs(cand):
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
        else:
            found = shutil.which(cand)
            if found:
                return found
    return None


# --------------------------------------------------------------------------- minimal websocket client

class _WebSocket:
    """Just enough RFC 6455 for a local DevTools endpoint: text frames, masking, fragments, ping/close."""

    def __init__(self, url: str, timeout: float):
        u = urlsplit(url)
        if u.scheme != "ws":
            raise BrowserError(f"unsupported websocket url {url!r}")
        host, port = u.hostname or "127.0.0.1", u.port or 80
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        # No Origin header: Chromium only checks --remote-allow-origins when one is sent.
        req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        self._buf = b""
        head = self._read_until(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise BrowserError(f"websocket handshake refused: {status.decode(errors='replace')}")
        expect = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode())
                                  .digest()).decode()
        if expect.encode() not in head:
            raise BrowserError("websocket handshake: bad Sec-WebSocket-Accept")

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BrowserError("websocket closed during handshake")
            self._buf += chunk
        head, self._buf = self._buf.split(marker, 1)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise BrowserError("websocket closed by the browser")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv_text(self, timeout: float) -> str | None:
        """Next complete text message, or None when nothing arrives within ``timeout`` seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        parts: list[bytes] = []
        try:
            while True:
                b0, b1 = self._read_exact(2)
                # once a frame has started, finish reading it even if it is slow
                self.sock.settimeout(30)
                fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self._read_exact(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self._read_exact(8))[0]
                mask = self._read_exact(4) if b1 & 0x80 else None
                payload = self._read_exact(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 0x9:  # ping
                    self._send_frame(0xA, payload)
                elif opcode == 0x8:  # close
                    raise BrowserError("websocket closed by the browser")
                elif opcode in (0x0, 0x1, 0x2):
                    parts.append(payload)
                    if fin:
                        return b"".join(parts).decode()
                # 0xA (pong) and anything else: ignore
        except TimeoutError:  # socket.timeout
            if parts:
                raise BrowserError("websocket message truncated") from None
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, struct.pack("!H", 1000))
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------- DevTools session

def _remote_object(obj: dict) -> str:
    if "value" in obj:
        v = obj["value"]
        return v if isinstance(v, str) else json.dumps(v)
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type", "?"))


def _exception_text(details: dict) -> str:
    exc = details.get("exception") or {}
    text = exc.get("description") or details.get("text") or "exception"
    where = details.get("url") or ""
    if where:
        text += f" ({where}:{details.get('lineNumber', 0) + 1}:{details.get('columnNumber', 0) + 1})"
    return text


class PageResult:
    """A loaded page. ``errors``: console errors, uncaught exceptions and failed loads, in order."""

    def __init__(self, ws: _WebSocket, session: str, url: str):
        self._ws = ws
        self._session = session
        self._next_id = 0
        self.url = url
        self.errors: list[str] = []
        self.console: list[str] = []  # every console message, "type: text" (for diagnostics)
        self._requests: dict[str, str] = {}  # requestId -> url, to name failed loads
        self.loaded = False

    # ---- protocol plumbing
    def _send(self, method: str, params: dict | None = None, session: bool = True,
              timeout: float = 30) -> dict:
        self._next_id += 1
        msg_id = self._next_id
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self._session
        self._ws.send_text(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no DevTools reply to {method} within {timeout:.0f}s")
            m = self._ws.recv_text(left)
            if m is None:
                continue
            data = json.loads(m)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise BrowserError(f"{method}: {data['error']}")
                return data.get("result", {})
            self._handle(data)

    def _pump(self, seconds: float) -> None:
        """Process events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            m = self._ws.recv_text(left)
            if m is not None:
                self._handle(json.loads(m))

    def _handle(self, data: dict) -> None:
        method, p = data.get("method"), data.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_object(a) for a in p.get("args", []))
            self.console.append(f"{p.get('type')}: {text}")
            if p.get("type") in ("error", "assert"):
                self.errors.append(f"console.{p.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            self.errors.append(f"uncaught exception: {_exception_text(p.get('exceptionDetails', {}))}")
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            self.console.append(f"log-{e.get('level')}: {e.get('text')}")
            if e.get("level") == "error":
                self.errors.append(f"log error [{e.get('source')}]: {e.get('text')} {e.get('url', '')}".rstrip())
        elif method == "Network.loadingFailed":
            if not p.get("canceled"):
                self.errors.append(f"failed load: {p.get('errorText')} ({self._requests.get(p.get('requestId'), '?')})")
        elif method == "Network.requestWillBeSent":
            self._requests[p.get("requestId")] = p.get("request", {}).get("url", "?")
        elif method == "Network.responseReceived":
            r = p.get("response", {})
            if r.get("status", 0) >= 400:
                self.errors.append(f"failed load: HTTP {r.get('status')} ({r.get('url')})")
        elif method == "Page.loadEventFired":
            self.loaded = True
        elif method == "Inspector.targetCrashed":
            self.errors.append("renderer crashed")
            self.loaded = True

    # ---- public
    def evaluate(self, js: str, timeout: float = 15) -> Any:
        """Evaluate ``js`` (an expression; promises are awaited) in the page; return its JSON value."""
        r = self._send("Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True,
                                            "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in r:
            raise JSError(_exception_text(r["exceptionDetails"]))
        return r.get("result", {}).get("value")

    def settle(self, seconds: float = 0.5) -> list[str]:
        """Keep collecting events for ``seconds``; returns ``errors``."""
        self._pump(seconds)
        return self.errors


def _wait_for_ws_url(proc: subprocess.Popen, profile: Path, stderr_tail: collections.deque,
                     deadline: float) -> str:
    found: dict[str, str] = {}

    def reader() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            stderr_tail.append(line)
            m = _WS_LINE.search(line)
            if m and "url" not in found:
                found["url"] = m.group(1)

    threading.Thread(target=reader, daemon=True).start()
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if "url" in found:
            return found["url"]
        if port_file.is_file():  # fallback: Chromium also writes "<port>\n<path>" here
            lines = port_file.read_text().split()
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if proc.poll() is not None:
            time.sleep(0.2)  # let the reader thread catch the last lines
            tail = " | ".join(list(stderr_tail)[-5:])
            raise BrowserError(f"chromium exited with code {proc.returncode} before DevTools was up: {tail}")
        time.sleep(0.05)
    raise BrowserError("chromium did not report a DevTools websocket in time: "
                       + " | ".join(list(stderr_tail)[-5:]))


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in group ``pgid``.

    Orphaned Chromium children become zombies until PID 1 reaps them; they hold nothing, so they
    do not count (on Linux, read from /proc; elsewhere any member counts).
    """
    if os.path.isdir("/proc/self"):
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop(proc: subprocess.Popen, grace: float = 3) -> None:
    """End Chromium's process group (it was started in a session of its own, so pgid == pid)."""
    pgid = proc.pid
    try:
        proc.wait(grace)  # after Browser.close it usually exits by itself
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(5)
    # renderer/zygote children may outlive the browser process briefly; give them a moment, then kill
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def open_page(path: str | os.PathLike, timeout: float = 30, settle: float = 0.5,
              chromium: str | None = None) -> Iterator[PageResult]:
    """Load ``path`` (a local HTML file) in headless Chromium; yield a :class:`PageResult`.

    Waits for the load event (at most ``timeout`` seconds from launch, else :class:`BrowserError`),
    then collects events for ``settle`` more seconds.  Call ``page.settle()`` again after
    ``evaluate`` if late errors matter.  Raises :class:`BrowserError` when Chromium is missing.
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise BrowserError("chromium not found")
    url = Path(path).resolve().as_uri()
    deadline = time.monotonic() + timeout
    profile = Path(tempfile.mkdtemp(prefix="mdiff-chromium-"))
    stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
    proc = subprocess.Popen(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    ws: _WebSocket | None = None
    try:
        ws_url = _wait_for_ws_url(proc, profile, stderr_tail, deadline)
        ws = _WebSocket(ws_url, timeout=max(deadline - time.monotonic(), 1))
        page = PageResult(ws, session="", url=url)
        target = page._send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        page._session = page._send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                   session=False)["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network", "Inspector"):
            page._send(f"{domain}.enable")
        nav = page._send("Page.navigate", {"url": url})
        if nav.get("errorText"):
            page.errors.append(f"navigation failed: {nav['errorText']} ({url})")
            page.loaded = True
        while not page.loaded:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"page did not fire its load event within {timeout:.0f}s: {url}")
            m = ws.recv_text(left)
            if m is not None:
                page._handle(json.loads(m))
        page.settle(settle)
        yield page
    finally:
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.send_text(json.dumps({"id": 10**9, "method": "Browser.close"}))
            ws.close()
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)
