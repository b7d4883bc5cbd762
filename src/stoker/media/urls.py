"""Images over http(s), fetched on a client's behalf without letting the client reach what the server can.

The host must resolve to public addresses only (private, loopback and link-local ones need
``allow_private_urls: true``; unspecified, multicast and reserved ones are always refused), and every redirect is
checked the same way. The connection goes to the address that was checked, so a second DNS answer cannot swap in
another. Size, time and redirects are bounded; the time limit (``image_fetch_timeout``) is one deadline for the whole
fetch, which a timer enforces by shutting the socket, because a per-read timeout restarts with every byte that a
server trickles.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

from stoker.config import Settings
from stoker.errors import MediaError
from stoker.media.images import check_size, short

MAX_REDIRECTS = 3


def check_address(ip: str, settings: Settings, kind: str = "image") -> None:
    """Refuse addresses a server should not fetch from on a client's behalf (SSRF)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    local = address.is_loopback or address.is_link_local
    if address.is_unspecified or address.is_multicast or (address.is_reserved and not local):
        raise MediaError(f"the {kind} URL points to {ip}, which is not a public address.", param="messages")
    if (local or not address.is_global) and not settings.allow_private_urls:
        raise MediaError(
            f"the {kind} URL points to {ip}, a private or loopback address; set allow_private_urls: true to allow it.",
            param="messages",
        )


def _resolve(host: str, port: int, settings: Settings, kind: str) -> str:
    """One checked address for ``host``; every address it resolves to must pass, so none can be chosen later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise MediaError(f"cannot resolve the {kind} URL host {host!r}.", param="messages") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for ip in addresses:
        check_address(ip, settings, kind)
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an already checked address, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip
        self.opened: socket.socket | None = None  # kept: getresponse() drops self.sock when the response owns it

    def connect(self) -> None:
        self.sock = self.opened = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip
        self.opened: socket.socket | None = None  # kept: getresponse() drops self.sock when the response owns it

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self.opened = self._context.wrap_socket(sock, server_hostname=self.host)  # checked for the host


class _Cutoff:
    """Shuts a connection's socket at the deadline, so that no read (the status line and headers included) outlives
    it; ``fired`` tells an error (or an early end of the body) that came from the cut."""

    def __init__(self, conn: _PinnedHTTPConnection | _PinnedHTTPSConnection, seconds: float):
        self.fired = False
        self._conn = conn
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self._conn.opened
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def fetch_url(url: str, settings: Settings, *, timeout: float | None = None, kind: str = "image") -> bytes:
    """GET an image (or a video: ``kind``) over http(s): public hosts only (see ``check_address``), bounded size,
    time and redirects.

    ``timeout``: seconds for the whole fetch, redirects included (default ``image_fetch_timeout``)."""
    timeout = settings.image_fetch_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    timed_out = MediaError(
        f"fetching the {kind} URL took longer than {timeout:g} s (image_fetch_timeout): the server is slow or "
        f"unreachable; send the {kind} as a data: URL instead.", param="messages")
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaError(f"the {kind} URL redirects to an unsupported scheme {scheme!r}.", param="messages")
        host = parts.hostname
        if not host:
            raise MediaError(f"the {kind} URL {short(url)!r} has no host.", param="messages")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise MediaError(f"the {kind} URL {short(url)!r} has an invalid port.", param="messages") from None
        ip = _resolve(host, port, settings, kind)
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, ip, timeout=left)
        cutoff = _Cutoff(conn, left)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers={"User-Agent": "stoker", "Accept": f"{kind}/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise MediaError(f"fetching the {kind} URL failed: HTTP {response.status}.", param="messages")
            length = response.getheader("Content-Length")
            if length and length.isdigit():
                check_size(int(length), settings, f"the {kind} at {short(url)}", kind)
            data = _read_bounded(response, settings, url, kind)
            if cutoff.fired:
                raise timed_out
            return data
        except (OSError, http.client.HTTPException) as exc:
            if cutoff.fired or isinstance(exc, TimeoutError):
                raise timed_out from None
            raise MediaError(f"fetching the {kind} URL failed: {exc}.", param="messages") from None
        finally:
            cutoff.cancel()
            conn.close()
    raise MediaError(f"the {kind} URL redirects more than {MAX_REDIRECTS} times.", param="messages")


def _read_bounded(response: Any, settings: Settings, url: str, kind: str) -> bytes:
    limit = getattr(settings, f"{kind}_max_bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = response.read1(65536)  # what one receive brings: the size cap holds while bytes trickle in
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise MediaError(
                f"the {kind} at {short(url)} is over the {kind}_max_bytes limit of {limit:,} bytes.",
                param="messages",
            )
        chunks.append(chunk)
