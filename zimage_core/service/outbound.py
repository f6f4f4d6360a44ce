"""Outbound HTTP calls a request can ask for (``webhookURL``, ``uploadEndpoint``) and the policy that guards them.

Off unless the operator allows them. When allowed: http(s) only; the host is resolved once and every address is
checked against the policy (loopback, private, link-local, carrier-grade NAT, multicast, reserved and cloud-metadata
ranges are denied unless an operator-given network allows them); the connection goes to the checked address (no
second DNS lookup that could answer differently); redirects are never followed (a 3xx is a failure); one total
deadline covers connect, send and read; the response body is read up to a size cap. Failures are reported to the
client as a generic code, never with the remote's text.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
CGNAT = ipaddress.ip_network("100.64.0.0/10")


class OutboundError(Exception):
    """A refused or failed outbound call. ``reason`` is for the server log only; clients get a generic code."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class OutboundPolicy:
    enabled: bool = False
    allow_networks: list = field(default_factory=list)  # ip_network objects explicitly allowed (e.g. 10.1.2.0/24)
    deadline_s: float = 10.0
    max_response_bytes: int = 64 * 1024

    @classmethod
    def from_strings(cls, enabled: bool, networks: list[str] | None = None, **kw) -> OutboundPolicy:
        return cls(enabled, [ipaddress.ip_network(n, strict=False) for n in networks or []], **kw)

    def address_allowed(self, addr: str) -> bool:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow_networks if net.version == ip.version):
            return True
        if ip in METADATA_ADDRESSES or (ip.version == 4 and ip in CGNAT):
            return False
        return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)

    def resolve(self, host: str, port: int) -> str:
        """The first resolved address of ``host``; every resolved address must be allowed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise OutboundError(f"cannot resolve {host!r}: {e}") from None
        addrs = [info[4][0] for info in infos]
        if not addrs:
            raise OutboundError(f"{host!r} resolves to no address")
        denied = [a for a in addrs if not self.address_allowed(a)]
        if denied:
            raise OutboundError(f"{host!r} resolves to a denied address {denied[0]}")
        return addrs[0]


def check_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of an http(s) URL, or OutboundError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundError("only http(s) URLs with a host are allowed")
    if parts.username or parts.password:
        raise OutboundError("credentials in the URL are not allowed")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise OutboundError("bad port") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, path


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a fixed, already-checked address, with SNI and certificate checks for the URL's host name."""

    def __init__(self, host, address, port, timeout, context):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host, address, port, timeout):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def call(policy: OutboundPolicy, method: str, url: str, body: bytes, content_type: str) -> int:
    """One outbound request under ``policy``; returns the 2xx status or raises OutboundError."""
    if not policy.enabled:
        raise OutboundError("outbound calls are disabled")
    start = time.monotonic()
    scheme, host, port, path = check_url(url)
    address = policy.resolve(host, port)

    def remaining() -> float:
        left = policy.deadline_s - (time.monotonic() - start)
        if left <= 0:
            raise OutboundError(f"deadline of {policy.deadline_s:g} s exceeded")
        return left

    if scheme == "https":
        conn = _PinnedHTTPS(host, address, port, remaining(), ssl.create_default_context())
    else:
        conn = _PinnedHTTP(host, address, port, remaining())
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type, "User-Agent": "zimage-fast"})
        sock = conn.sock  # the response may close the connection object; the socket's timeout still applies
        sock.settimeout(remaining())
        resp = conn.getresponse()
        read = 0
        while True:
            sock.settimeout(remaining())
            chunk = resp.read1(16384)  # returns what has arrived: a slow drip cannot outlast the deadline
            if not chunk:
                break
            read += len(chunk)
            if read > policy.max_response_bytes:
                raise OutboundError(f"response larger than {policy.max_response_bytes} bytes")
        remaining()
        if 300 <= resp.status < 400:
            raise OutboundError(f"HTTP {resp.status}: redirects are not followed")
        if not 200 <= resp.status < 300:
            raise OutboundError(f"HTTP {resp.status}")
        return resp.status
    except OutboundError:
        raise
    except (OSError, http.client.HTTPException) as e:  # timeouts are OSError too
        raise OutboundError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
    finally:
        conn.close()
