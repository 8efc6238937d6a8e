"""Fetching user-supplied media safely: ``data:`` URLs and remote ``http(s)://`` URLs.

Remote URLs go through an SSRF guard:

* the host is resolved once (through an injectable :class:`Resolver`) and refused when ANY address is
  loopback, private, link-local, multicast, reserved, unspecified, carrier-grade NAT, a cloud metadata
  endpoint, or an IPv6 form that embeds one of those (IPv4-mapped, 6to4, NAT64);
* numeric host tricks (``2130706433``, ``0177.0.0.1``, ``0x7f.1``) are parsed here as IPv4 literals, the way
  ``inet_aton`` would, so they never reach a resolver as names;
* the request is sent to the validated IP itself (the URL host is rewritten to it) while the ``Host`` header
  and the TLS SNI / certificate check keep the original name (httpcore's ``sni_hostname`` extension). The
  HTTP stack never resolves the name again, so a DNS rebinding between check and connect cannot bypass the
  guard. ``Connection: close`` keeps a pooled connection opened for one name from serving another;
* redirects are followed by hand, each hop checked again, at most ``max_redirects``;
* the body is streamed under a running size cap, the whole fetch under one total timeout, and the payload
  must be an image / video by its Content-Type or, for ``application/octet-stream``, by its magic bytes.

``FetchLimits.allow_private`` switches the private-address refusal off (local use and tests only);
``FetchLimits.allowed_networks`` opens chosen networks (an internal media store) without opening the rest.
Cloud metadata addresses and names are refused whatever these say.

Error messages name the URL host at most: never the path or query (signed URLs carry secrets there).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

MediaKind = Literal["image", "video"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MIB = 1024 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_OCTET_STREAM_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, ...
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
    }
)
_METADATA_NAMES = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
_CGNAT_NETWORK = ipaddress.ip_network("100.64.0.0/10")
_NAT64_NETWORKS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_LEGACY_IPV4_PART = re.compile(r"^(?:0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*)$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_HOST_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_USER_AGENT = "qwen3vl-serve-media/1"


@dataclass(frozen=True)
class FetchLimits:
    """Limits for fetching remote media (``image_url``/``video_url``): bytes, time, redirects, networks.
    (Not the model service's ``MediaLimits``, which bound decoding: pixels, frames, items per request.)

    ``allow_private`` is an operator escape hatch for local runs and tests: it lets remote URLs reach
    loopback and private networks. Off by default; never turn it on for a public deployment.
    ``allowed_networks`` (CIDR strings) opens only the listed networks, e.g. an internal media store.
    """

    max_image_bytes: int = 20 * _MIB
    max_video_bytes: int = 100 * _MIB
    fetch_timeout_seconds: float = 15.0
    max_redirects: int = 3
    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0 or self.max_video_bytes <= 0:
            raise ValueError("media size limits must be positive")
        if self.fetch_timeout_seconds <= 0:
            raise ValueError("fetch_timeout_seconds must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must not be negative")
        for network in self.allowed_networks:
            ipaddress.ip_network(network, strict=False)  # raises ValueError on a bad entry

    def max_bytes(self, kind: MediaKind) -> int:
        return self.max_image_bytes if kind == "image" else self.max_video_bytes


class MediaError(Exception):
    """A media URL or payload the service refuses; the api answers 400 invalid_request_error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedMediaURL(MediaError):
    """Not a ``data:`` or ``http(s)://`` URL, or a malformed one."""


class ForbiddenMediaAddress(MediaError):
    """The SSRF guard refused the host (private, loopback, metadata, ...)."""


class MediaTooLarge(MediaError):
    """The payload is over the size limit for its kind."""


class InvalidMediaContent(MediaError):
    """Bad base64, or a payload / content type that is not the expected kind of media."""


class MediaFetchError(MediaError):
    """The remote fetch failed: HTTP status, network error, timeout, too many redirects."""


class Resolver(Protocol):
    """Turns a host name into IP address strings (injectable so that tests never touch real DNS)."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """The operating system's resolver, run off the event loop by ``loop.getaddrinfo``."""

    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]


def build_media_client(limits: FetchLimits) -> httpx.AsyncClient:
    """A client suited to :func:`resolve_media`: no environment proxies, no redirects, no keep-alive."""
    return httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        timeout=limits.fetch_timeout_seconds,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
    )


async def resolve_media(
    url: str,
    kind: MediaKind,
    client: httpx.AsyncClient,
    limits: FetchLimits,
    *,
    resolver: Resolver | None = None,
) -> bytes:
    """The bytes of a ``data:`` or ``http(s)://`` media URL, checked to be an image / a video.

    Raises :class:`MediaError` (or a subclass) for anything the service refuses.
    """
    url = url.strip() if isinstance(url, str) else ""
    scheme = _scheme_of(url)
    if scheme == "data":
        return decode_data_url(url, kind, limits)
    if scheme in ("http", "https"):
        return await _fetch_remote(url, kind, client, limits, resolver or SystemResolver())
    if scheme is None:
        raise UnsupportedMediaURL("unsupported media URL: expected a data: URL or an http(s):// URL")
    raise UnsupportedMediaURL(
        f"unsupported URL scheme {scheme[:16]!r}: media must be a data: URL or an http(s):// URL"
    )


def _scheme_of(url: str) -> str | None:
    scheme, sep, _ = url.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return None
    return scheme.lower()


# ---------------------------------------------------------------------------------------------- data URLs


def decode_data_url(url: str, kind: MediaKind, limits: FetchLimits) -> bytes:
    """Decode a ``data:<mime>;base64,<payload>`` URL, checking size before decoding."""
    header, sep, payload = url[5:].partition(",")
    if not sep or len(header) > 256:
        raise UnsupportedMediaURL("malformed data URL: expected data:<mime>;base64,<payload>")
    mime, *params = (part.strip().lower() for part in header.split(";"))
    if "base64" not in params:
        raise UnsupportedMediaURL("data URLs must be base64-encoded (data:<mime>;base64,...)")
    _check_declared_type(mime, kind, "data URL")
    data = _decode_base64(payload, limits.max_bytes(kind), kind)
    check_payload(data, mime, kind, "data URL")
    return data


def _decode_base64(payload: str, limit: int, kind: MediaKind) -> bytes:
    encoded_limit = 4 * -(-limit // 3)
    # Room for line breaks (MIME wraps at 76 characters), checked before any copy or decoding.
    if len(payload) > encoded_limit + encoded_limit // 38 + 4:
        raise _too_large(kind, limit, "data URL")
    compact = "".join(payload.split())
    if len(compact) > encoded_limit:
        raise _too_large(kind, limit, "data URL")
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMediaContent("data URL payload is not valid base64") from None
    if len(data) > limit:
        raise _too_large(kind, limit, "data URL")
    return data


def _too_large(kind: MediaKind, limit: int, origin: str) -> MediaTooLarge:
    return MediaTooLarge(f"{kind} from {origin} is larger than the limit of {limit} bytes")


# ----------------------------------------------------------------------------------------- type checks


def sniff_media_type(data: bytes) -> str | None:
    """The MIME type that the magic bytes of ``data`` announce, or None when not recognised."""
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if head.startswith(b"BM") and len(head) >= 14:
        return "image/bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm" if b"webm" in data[:256] else "video/x-matroska"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "video/mpeg"
    if len(data) > 188 and data[0] == 0x47 and data[188] == 0x47:
        return "video/mp2t"
    return _sniff_iso_bmff(head)


def _sniff_iso_bmff(head: bytes) -> str | None:
    box = head[4:8]
    if box == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "image/avif"
        if brand in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"):
            return "image/heif"
        return "video/quicktime" if brand == b"qt  " else "video/mp4"
    if box in (b"moov", b"mdat", b"wide", b"free"):
        return "video/quicktime"
    return None


def _mime_kind(mime: str) -> str:
    return mime.partition("/")[0]


def _article(kind: MediaKind) -> str:
    return "an image" if kind == "image" else "a video"


def _check_declared_type(mime: str, kind: MediaKind, origin: str) -> None:
    if mime in _OCTET_STREAM_TYPES or _mime_kind(mime) == kind:
        return
    raise InvalidMediaContent(f"{origin}: content type {mime[:64]!r} is not {_article(kind)}")


def check_payload(data: bytes, declared_mime: str, kind: MediaKind, origin: str) -> None:
    """Refuse empty payloads and ones whose magic bytes contradict ``kind``.

    A declared ``image/*`` / ``video/*`` with unknown magic bytes is let through (newer formats; the model
    service decodes and has the last word); ``application/octet-stream`` needs recognised magic bytes.
    """
    if not data:
        raise InvalidMediaContent(f"{origin}: empty {kind} payload")
    sniffed = sniff_media_type(data)
    if sniffed is not None and _mime_kind(sniffed) != kind:
        raise InvalidMediaContent(f"{origin}: payload looks like {sniffed}, not {_article(kind)}")
    if sniffed is None and declared_mime in _OCTET_STREAM_TYPES:
        raise InvalidMediaContent(f"{origin}: payload is not a recognised {kind} format")


# ------------------------------------------------------------------------------------------ SSRF guard


def parse_ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one, including legacy IPv4 forms (``2130706433``, ``0x7f.1``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _parse_legacy_ipv4(host)


def _parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    parts = host.lower().split(".")
    if not 1 <= len(parts) <= 4 or not all(_LEGACY_IPV4_PART.match(part) for part in parts):
        return None
    values = [_legacy_part_value(part) for part in parts]
    *head, last = values
    if any(value > 255 for value in head) or last >= 256 ** (5 - len(values)):
        return None
    number = last
    for index, value in enumerate(head):
        number += value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _legacy_part_value(part: str) -> int:
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if part.startswith("0") and len(part) > 1:
        return int(part[1:], 8)
    return int(part)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in network for network in _NAT64_NETWORKS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_metadata_address(ip: IPAddress) -> bool:
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    return ip in _METADATA_ADDRESSES or embedded in _METADATA_ADDRESSES


def is_forbidden_address(ip: IPAddress) -> bool:
    """True for every address a public media fetch must not reach."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and is_forbidden_address(embedded):
            return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip in _CGNAT_NETWORK
        or is_metadata_address(ip)
    )


def _check_address(ip: IPAddress, host: str, limits: FetchLimits) -> None:
    if is_metadata_address(ip):
        raise ForbiddenMediaAddress(f"media host {host!r} is a cloud metadata endpoint")
    if any(ip in ipaddress.ip_network(net, strict=False) for net in limits.allowed_networks):
        return
    if limits.allow_private or not is_forbidden_address(ip):
        return
    raise ForbiddenMediaAddress(f"media host {host!r} resolves to a non-public address")


def _check_hostname(host: str, limits: FetchLimits) -> None:
    if host in _METADATA_NAMES:
        raise ForbiddenMediaAddress(f"media host {host!r} is a cloud metadata endpoint")
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise UnsupportedMediaURL(f"invalid media URL host {host[:64]!r}")
    if _NUMERIC_LABEL.match(labels[-1]):
        # A numeric last label is an IPv4 form that did not parse: refuse, never hand it to a resolver.
        raise UnsupportedMediaURL(f"invalid media URL host {host[:64]!r}")
    if not limits.allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise ForbiddenMediaAddress(f"media host {host!r} resolves to a non-public address")


@dataclass(frozen=True)
class _Target:
    """Where one hop really goes: the URL with the validated IP, and the name to present."""

    url: httpx.URL
    host: str
    host_header: str | None
    sni_hostname: str | None


def _normalised_host(url: httpx.URL) -> str:
    """The host as the network sees it: IDNA-encoded, lower case, without a trailing dot."""
    host = url.raw_host.decode("ascii").lower()
    return host[:-1] if host.endswith(".") else host


async def _pin(url: httpx.URL, limits: FetchLimits, resolver: Resolver) -> _Target:
    host = _normalised_host(url)
    if not host:
        raise UnsupportedMediaURL("media URL has no host")
    literal = parse_ip_literal(host)
    if literal is not None:
        if isinstance(literal, ipaddress.IPv6Address) and literal.scope_id:
            raise UnsupportedMediaURL(f"invalid media URL host {host[:64]!r}")
        _check_address(literal, host, limits)
        return _Target(url.copy_with(host=str(literal)), host, None, None)
    _check_hostname(host, limits)
    addresses = await _resolve(resolver, host, url.port or (443 if url.scheme == "https" else 80))
    for address in addresses:
        _check_address(address, host, limits)
    pinned = url.copy_with(host=str(addresses[0]))
    return _Target(pinned, host, url.netloc.decode("ascii"), host)


async def _resolve(resolver: Resolver, host: str, port: int) -> list[IPAddress]:
    try:
        raw = await resolver.resolve(host, port)
    except (OSError, UnicodeError):
        raise MediaFetchError(f"could not resolve media host {host!r}") from None
    try:
        # A scope id ("fe80::1%eth0") matters only for link-local addresses, which are refused anyway.
        addresses = [ipaddress.ip_address(address.split("%", 1)[0]) for address in raw]
    except ValueError:
        raise MediaFetchError(f"could not resolve media host {host!r}") from None
    if not addresses:
        raise MediaFetchError(f"could not resolve media host {host!r}")
    return addresses


# ---------------------------------------------------------------------------------------- remote fetch


def _parse_http_url(url: str | httpx.URL, base: httpx.URL | None = None) -> httpx.URL:
    try:
        parsed = base.join(url) if base is not None else httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        raise UnsupportedMediaURL("malformed media URL") from None
    if parsed.scheme not in ("http", "https"):
        scheme = parsed.scheme[:16] or "(none)"
        raise UnsupportedMediaURL(f"unsupported URL scheme {scheme!r}: media must be an http(s):// URL")
    if parsed.userinfo:
        raise UnsupportedMediaURL("media URLs must not carry credentials")
    return parsed


async def _fetch_remote(
    url: str, kind: MediaKind, client: httpx.AsyncClient, limits: FetchLimits, resolver: Resolver
) -> bytes:
    current = _parse_http_url(url)
    host = _normalised_host(current)
    try:
        async with asyncio.timeout(limits.fetch_timeout_seconds):
            return await _follow(current, kind, client, limits, resolver)
    except (TimeoutError, httpx.TimeoutException):
        raise MediaFetchError(
            f"fetching media from {host!r} timed out after {limits.fetch_timeout_seconds:g}s"
        ) from None


async def _follow(
    url: httpx.URL, kind: MediaKind, client: httpx.AsyncClient, limits: FetchLimits, resolver: Resolver
) -> bytes:
    for _ in range(limits.max_redirects + 1):
        target = await _pin(url, limits, resolver)
        response = await _send(client, target, kind, limits)
        try:
            location = response.headers.get("location")
            if response.status_code in _REDIRECT_STATUSES and location:
                url = _parse_http_url(location, base=url)
                continue
            return await _read_body(response, kind, limits, target.host)
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as exc:
            raise _network_error(target.host, exc) from None
        finally:
            await response.aclose()
    raise MediaFetchError(f"too many redirects fetching media (more than {limits.max_redirects})")


def _network_error(host: str, exc: Exception) -> MediaFetchError:
    return MediaFetchError(f"could not fetch media from {host!r} ({type(exc).__name__})")


async def _send(
    client: httpx.AsyncClient, target: _Target, kind: MediaKind, limits: FetchLimits
) -> httpx.Response:
    headers = {
        "Accept": f"{kind}/*, application/octet-stream;q=0.5",
        "Accept-Encoding": "identity",
        "User-Agent": _USER_AGENT,
        # One connection per fetch: a pooled connection to this IP may have been opened (TLS-verified)
        # for another name.
        "Connection": "close",
    }
    if target.host_header is not None:
        headers["Host"] = target.host_header
    extensions: dict[str, object] = {"timeout": httpx.Timeout(limits.fetch_timeout_seconds).as_dict()}
    if target.sni_hostname is not None:
        extensions["sni_hostname"] = target.sni_hostname
    # Built by hand, not with client.build_request: no client cookies, auth or default headers reach
    # media hosts.
    request = httpx.Request("GET", target.url, headers=headers, extensions=extensions)
    try:
        return await client.send(request, stream=True, auth=None, follow_redirects=False)
    except httpx.TimeoutException:
        raise
    except httpx.HTTPError as exc:
        raise _network_error(target.host, exc) from None


async def _read_body(response: httpx.Response, kind: MediaKind, limits: FetchLimits, host: str) -> bytes:
    origin = f"media host {host!r}"
    if not 200 <= response.status_code < 300:
        raise MediaFetchError(f"fetching media from {host!r} failed with HTTP {response.status_code}")
    limit = limits.max_bytes(kind)
    declared_length = response.headers.get("content-length", "")
    if declared_length.strip().isdigit() and int(declared_length) > limit:
        raise _too_large(kind, limit, origin)
    mime = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    _check_declared_type(mime, kind, origin)
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            raise _too_large(kind, limit, origin)
        chunks.append(chunk)
    data = b"".join(chunks)
    check_payload(data, mime, kind, origin)
    return data
