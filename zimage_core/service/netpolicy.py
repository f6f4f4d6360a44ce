"""Outbound calls of a request (``webhookURL`` POSTs, ``uploadEndpoint`` PUTs): one policy, in one place, used by the
library-level service (``infer.py``) and the network server (``server.py``).

- Off by default: a request naming a ``webhookURL`` or ``uploadEndpoint`` is refused unless outbound calls are
  enabled (``OutboundPolicy(enabled=True)``, server flag ``--allow-outbound``).
- Resolved-address check: the host name is resolved once and every address must be allowed (``address_allowed``:
  public, i.e. not loopback, private, link-local, carrier-grade NAT, multicast, reserved, unspecified or cloud
  metadata, unless ``allow_private`` or an operator-given network in ``allow_networks`` allows it); the connection
  goes to that checked address (no second lookup that could answer differently), with the original name for Host
  and TLS.
- No redirects: only a 2xx status counts as delivered; a 3xx is a failure, its Location is never followed.
- One total deadline (``deadline_s``) enforced on every socket operation, so neither a trickling endpoint nor
  ``numberResults`` webhooks can hold a request longer; the response body is read up to ``max_response_bytes``.
- No remote error text: the client learns only "failed"; the reason (status, timeout, refused) goes to the log.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from ..errors import RequestError

log = logging.getLogger("zimage_core.service.netpolicy")

MAX_RESPONSE_HEADER_BYTES = 16 * 1024
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
CGNAT = ipaddress.ip_network("100.64.0.0/10")


@dataclass(frozen=True)
class OutboundPolicy:
    enabled: bool = False  # outbound calls at all
    allow_private: bool = False  # loopback / private / link-local targets (tests, a trusted LAN); never metadata
    deadline_s: float = 10.0  # total for all outbound calls of one request (or of one ``call``)
    ports: tuple[int, ...] = (80, 443, 8080, 8443)  # allowed destination ports (() = any)
    allow_networks: tuple = ()  # ip_network objects explicitly allowed (e.g. 10.1.2.0/24)
    max_response_bytes: int = 64 * 1024

    @classmethod
    def from_strings(cls, enabled: bool, networks: list[str] | None = None, **kw) -> OutboundPolicy:
        """The server's CLI form: CIDR strings; any port unless ``ports`` is given."""
        kw.setdefault("ports", ())
        return cls(enabled, allow_networks=tuple(ipaddress.ip_network(n, strict=False) for n in networks or []), **kw)

    def deadline(self) -> Deadline:
        return Deadline(time.monotonic() + self.deadline_s)

    def address_allowed(self, addr: str) -> bool:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow_networks if net.version == ip.version):
            return True
        if ip in METADATA_ADDRESSES or (ip.version == 4 and ip in CGNAT):
            return False
        if self.allow_private:
            return True
        return ip.is_global and not (
            ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback or ip.is_link_local
        )


@dataclass
class Deadline:
    at: float  # time.monotonic() value

    def remaining(self) -> float:
        return self.at - time.monotonic()


class OutboundError(Exception):
    """An outbound call that did not deliver; ``reason`` is for the log, never for the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_target(url: str, field: str, policy: OutboundPolicy) -> tuple[str, int, str, str]:
    """Validate a URL against the policy before any work is done: (host, port, path, checked address).

    Raises RequestError naming ``field`` when outbound calls are off, the URL is malformed, the name does not resolve,
    any resolved address is not allowed or the port is not allowed. Address literals are not looked up."""
    if not policy.enabled:
        raise RequestError(field, "outbound calls (webhooks, uploads) are disabled on this server")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RequestError(field, "is not a valid http(s) URL") from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise RequestError(field, "must be an http(s) URL without credentials")
    try:  # an address literal needs no lookup
        addrs = [str(ipaddress.ip_address(host.split("%", 1)[0]))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise RequestError(field, "host name does not resolve") from None
        addrs = sorted({info[4][0] for info in infos})
    if not addrs:
        raise RequestError(field, "host name does not resolve")
    denied = [a for a in addrs if not policy.address_allowed(a)]
    if denied:
        raise RequestError(field, f"host resolves to a non-public, denied address {denied[0]}")
    if policy.ports and port not in policy.ports:  # after the address check: a denied address is the reason given
        raise RequestError(field, f"port {port} is not allowed (allowed: {', '.join(map(str, policy.ports))})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, port, path, addrs[0]


def send(
    method: str, url: str, body: bytes, content_type: str, field: str, policy: OutboundPolicy, deadline: Deadline
) -> int:
    """One HTTP request to a checked address within the deadline; returns the 2xx status or raises OutboundError
    (or RequestError for a target the policy refuses)."""
    host, port, path, addr = check_target(url, field, policy)
    scheme = urllib.parse.urlsplit(url).scheme

    def budget() -> float:
        left = deadline.remaining()
        if left <= 0:
            raise OutboundError("deadline exceeded")
        return left

    try:
        sock = socket.create_connection((addr, port), timeout=budget())
    except OSError as e:
        raise OutboundError(f"connect failed ({type(e).__name__})") from None
    try:
        if scheme == "https":
            sock.settimeout(budget())
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        host_header = host if port in (80, 443) else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" if port in (80, 443) else f"[{host}]:{port}"
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nUser-Agent: zimage-fast\r\n\r\n"
        ).encode("latin-1", "replace")
        data = head + body
        sent = 0
        while sent < len(data):
            sock.settimeout(budget())
            sent += sock.send(data[sent : sent + 65536])
        received = b""
        while b"\r\n\r\n" not in received:
            sock.settimeout(budget())
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
            if len(received) > MAX_RESPONSE_HEADER_BYTES:
                raise OutboundError("response header too long")
        header, _, rest = received.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        status_line = lines[0].split()
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/") or not status_line[1].isdigit():
            raise OutboundError("not an HTTP response")
        status = int(status_line[1])
        if 300 <= status < 400:
            raise OutboundError(f"HTTP {status}: redirects are not followed")
        if not 200 <= status < 300:
            raise OutboundError(f"HTTP {status}")
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        too_big = f"response larger than {policy.max_response_bytes} bytes"
        if length is not None and length > policy.max_response_bytes:
            raise OutboundError(too_big)
        read = len(rest)
        while length is None or read < length:  # Connection: close, so EOF ends a body without a length
            if read > policy.max_response_bytes:
                raise OutboundError(too_big)
            sock.settimeout(budget())
            chunk = sock.recv(16384)
            if not chunk:
                break
            read += len(chunk)
        if read > policy.max_response_bytes:
            raise OutboundError(too_big)
        return status
    except OutboundError:
        raise
    except (OSError, ssl.SSLError, ValueError) as e:
        raise OutboundError(f"{type(e).__name__}") from None
    finally:
        try:
            sock.close()
        except OSError:
            pass


def deliver(
    method: str,
    url: str,
    body: bytes,
    content_type: str,
    field: str,
    policy: OutboundPolicy,
    deadline: Deadline,
) -> bool:
    """``send`` that logs the reason of a failure and returns False; the client never sees the remote's text."""
    try:
        send(method, url, body, content_type, field, policy, deadline)
        return True
    except OutboundError as e:
        log.warning("%s %s: %s", field, method, e.reason)
        return False


def call(policy: OutboundPolicy, method: str, url: str, body: bytes, content_type: str, field: str = "url") -> int:
    """The server's form: one ``send`` with its own deadline; a refused target is an OutboundError too."""
    try:
        return send(method, url, body, content_type, field, policy, policy.deadline())
    except RequestError as e:
        raise OutboundError(f"{field}: {e.message}") from None
