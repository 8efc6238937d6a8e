"""Media resolution: data URLs, the SSRF guard, and real fetches from a local server on 127.0.0.1.

No test resolves real names or sends traffic anywhere but to its own server on 127.0.0.1: names go through
``FakeResolver`` and refusals are checked against a recording transport that must stay untouched.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from services.api import media
from services.api.media import (
    FetchLimits,
    ForbiddenMediaAddress,
    InvalidMediaContent,
    MediaError,
    MediaFetchError,
    MediaTooLarge,
    UnsupportedMediaURL,
    build_media_client,
    resolve_media,
    sniff_media_type,
)
from tests.helpers.env import require_binary

pytestmark = pytest.mark.anyio

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(17)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(16)
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(16)
PUBLIC_IP = "93.184.216.34"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


class FakeResolver:
    """A resolver from a fixed table; every lookup is recorded. Unknown names fail like NXDOMAIN."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {}
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


class RecordingTransport(httpx.AsyncBaseTransport):
    """Answers in-process: nothing leaves the machine. ``reply`` None means no request may arrive."""

    def __init__(self, reply: httpx.Response | None = None) -> None:
        self.reply = reply
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.reply is None:
            raise AssertionError(f"unexpected request to {request.url.host}")
        return self.reply


# ------------------------------------------------------------------------------------------ data URLs


async def resolve_data(url: str, kind: media.MediaKind = "image", limits: FetchLimits | None = None) -> bytes:
    async with httpx.AsyncClient(transport=RecordingTransport()) as client:
        return await resolve_media(url, kind, client, limits or FetchLimits(), resolver=FakeResolver())


async def test_data_url_png() -> None:
    assert await resolve_data(data_url("image/png", PNG)) == PNG


async def test_data_url_video() -> None:
    assert await resolve_data(data_url("video/mp4", MP4), "video") == MP4


async def test_data_url_octet_stream_is_sniffed() -> None:
    assert await resolve_data(data_url("application/octet-stream", JPEG)) == JPEG
    with pytest.raises(InvalidMediaContent, match="not a recognised image"):
        await resolve_data(data_url("application/octet-stream", b"hello world"))


async def test_data_url_tolerates_line_breaks_and_urlsafe_alphabet() -> None:
    wrapped = base64.encodebytes(PNG * 4).decode()
    assert await resolve_data(f"data:image/png;base64,{wrapped}") == PNG * 4
    payload = b"\xff\xd8\xff\xfe" + bytes(range(250, 256)) * 3
    urlsafe = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    assert await resolve_data(f"DATA:image/jpeg;base64,{urlsafe}") == payload


async def test_data_url_bad_base64() -> None:
    with pytest.raises(InvalidMediaContent, match="base64"):
        await resolve_data("data:image/png;base64,iVBO!!not*base64")


@pytest.mark.parametrize(
    ("url", "kind", "message"),
    [
        (data_url("text/plain", PNG), "image", "is not an image"),
        (data_url("image/png", PNG), "video", "is not a video"),
        (data_url("video/mp4", PNG), "video", "looks like image/png"),
        (data_url("image/png", MP4), "image", "looks like video/mp4"),
        (data_url("image/png", b""), "image", "empty"),
    ],
)
async def test_data_url_wrong_type(url: str, kind: media.MediaKind, message: str) -> None:
    with pytest.raises(InvalidMediaContent, match=message):
        await resolve_data(url, kind)


async def test_data_url_not_base64_or_malformed() -> None:
    with pytest.raises(UnsupportedMediaURL, match="base64"):
        await resolve_data("data:image/png,%89PNG")
    with pytest.raises(UnsupportedMediaURL, match="malformed"):
        await resolve_data("data:image/png;base64")


async def test_data_url_over_size_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = FetchLimits(max_image_bytes=100)
    with pytest.raises(MediaTooLarge, match="100 bytes"):
        await resolve_data(data_url("image/png", PNG + bytes(100)), limits=limits)

    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an oversized payload")

    monkeypatch.setattr(media.base64, "b64decode", no_decoding)
    with pytest.raises(MediaTooLarge):
        await resolve_data("data:image/png;base64," + "A" * 1_000_000, limits=limits)


# ------------------------------------------------------------------------------------ sniffing helper


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (b"GIF89a" + bytes(10), "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"BM" + bytes(20), "image/bmp"),
        (b"II*\x00" + bytes(8), "image/tiff"),
        (b"MM\x00*" + bytes(8), "image/tiff"),
        (b"\x00\x00\x00\x1cftypavif" + bytes(8), "image/avif"),
        (MP4, "video/mp4"),
        (b"\x00\x00\x00\x14ftypqt  " + bytes(8), "video/quicktime"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "video/webm"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x82\x88matroska", "video/x-matroska"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "video/x-msvideo"),
        ((b"\x47" + bytes(187)) * 2, "video/mp2t"),
        (b"<html>", None),
        (b"", None),
    ],
)
def test_sniff_media_type(payload: bytes, expected: str | None) -> None:
    assert sniff_media_type(payload) == expected


# ------------------------------------------------------------------------ schemes and the SSRF guard


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "/etc/passwd",
        "../../etc/passwd",
        "ftp://ftp.example.com/cat.png",
        "javascript:alert(1)",
        "gopher://example.com/",
        "",
        "   ",
    ],
)
async def test_unsupported_schemes(url: str) -> None:
    transport, resolver = RecordingTransport(), FakeResolver()
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(UnsupportedMediaURL) as info:
            await resolve_media(url, "image", client, FetchLimits(allow_private=True), resolver=resolver)
    assert "passwd" not in str(info.value)
    assert transport.requests == [] and resolver.calls == []


GUARD_TABLE = {
    "localhost": ["127.0.0.1", "::1"],
    "internal.test": ["10.0.0.1"],
    "mixed.test": [PUBLIC_IP, "10.0.0.1"],
    "cgnat.test": ["100.64.0.7"],
    "mapped.test": ["::ffff:192.168.1.1"],
    "linklocal.test": ["fe80::1%eth0"],
}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/x",
        "http://localhost/",
        "http://LOCALHOST./",
        "http://api.localhost/",
        "http://[::1]/",
        "http://10.0.0.1/",
        "https://192.168.0.1/cat.png",
        "http://172.16.5.4/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:a00:1]/",
        "http://[2002:7f00:1::]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[fe80::1]/",
        "http://[fd00:ec2::254]/",
        "http://[ff02::1]/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.1/",
        "http://0x7f000001/",
        "http://127.1/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://999.1/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://internal.test/",
        "http://mixed.test/",
        "http://cgnat.test/",
        "http://mapped.test/",
        "http://linklocal.test/",
    ],
)
async def test_guard_refuses_without_traffic(url: str) -> None:
    transport, resolver = RecordingTransport(), FakeResolver(GUARD_TABLE)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(MediaError):
            await resolve_media(url, "image", client, FetchLimits(), resolver=resolver)
    assert transport.requests == []
    assert set(resolver.calls) <= set(GUARD_TABLE)  # literals and bad names never reach the resolver


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://metadata.google.internal/",
        "http://100.100.100.200/",
    ],
)
async def test_metadata_refused_even_with_allow_private(url: str) -> None:
    transport = RecordingTransport()
    limits = FetchLimits(allow_private=True, allowed_networks=("0.0.0.0/0", "::/0"))
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(ForbiddenMediaAddress, match="metadata"):
            await resolve_media(url, "image", client, limits, resolver=FakeResolver())
    assert transport.requests == []


async def test_errors_name_the_host_only() -> None:
    async with httpx.AsyncClient(transport=RecordingTransport()) as client:
        with pytest.raises(ForbiddenMediaAddress) as info:
            url = "http://10.0.0.1/private/path?token=SECRET"
            await resolve_media(url, "image", client, FetchLimits(), resolver=FakeResolver())
        assert "10.0.0.1" in str(info.value) and "SECRET" not in str(info.value)
        with pytest.raises(UnsupportedMediaURL, match="credentials") as info:
            url = f"http://user:SECRET@{PUBLIC_IP}/cat.png"
            await resolve_media(url, "image", client, FetchLimits(), resolver=FakeResolver())
        assert "SECRET" not in str(info.value)


async def test_unresolvable_host() -> None:
    async with httpx.AsyncClient(transport=RecordingTransport()) as client:
        with pytest.raises(MediaFetchError, match="could not resolve"):
            await resolve_media(
                "https://nx.test/a.png", "image", client, FetchLimits(), resolver=FakeResolver()
            )


class RebindingResolver(FakeResolver):
    """Public on the first lookup, private afterwards: a later lookup must never be used."""

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return [PUBLIC_IP] if len(self.calls) == 1 else ["127.0.0.1"]


async def test_request_is_pinned_to_the_validated_ip() -> None:
    transport = RecordingTransport(httpx.Response(200, headers={"Content-Type": "image/png"}, content=PNG))
    resolver = RebindingResolver()
    async with httpx.AsyncClient(transport=transport) as client:
        url = "https://media.example/cats/1.png?sig=abc"
        assert await resolve_media(url, "image", client, FetchLimits(), resolver=resolver) == PNG
    (request,) = transport.requests
    assert resolver.calls == ["media.example"]
    assert str(request.url) == f"https://{PUBLIC_IP}/cats/1.png?sig=abc"
    assert request.headers["host"] == "media.example"
    assert request.extensions["sni_hostname"] == "media.example"
    assert "cookie" not in request.headers and "authorization" not in request.headers


async def test_ipv6_pin_keeps_port_and_name() -> None:
    transport = RecordingTransport(httpx.Response(200, headers={"Content-Type": "video/mp4"}, content=MP4))
    resolver = FakeResolver({"v6.example": ["2606:2800:220:1:248:1893:25c8:1946"]})
    async with httpx.AsyncClient(transport=transport) as client:
        url = "https://v6.example:8443/clip.mp4"
        assert await resolve_media(url, "video", client, FetchLimits(), resolver=resolver) == MP4
    (request,) = transport.requests
    assert request.url.host == "2606:2800:220:1:248:1893:25c8:1946" and request.url.port == 8443
    assert request.headers["host"] == "v6.example:8443"


async def test_idna_host_is_resolved_and_presented_encoded() -> None:
    transport = RecordingTransport(httpx.Response(200, headers={"Content-Type": "image/png"}, content=PNG))
    resolver = FakeResolver({"xn--bcher-kva.example": [PUBLIC_IP]})
    async with httpx.AsyncClient(transport=transport) as client:
        url = "https://Bücher.example./a.png"
        assert await resolve_media(url, "image", client, FetchLimits(), resolver=resolver) == PNG
    (request,) = transport.requests
    assert resolver.calls == ["xn--bcher-kva.example"]
    assert request.extensions["sni_hostname"] == "xn--bcher-kva.example"


def test_limits_validation() -> None:
    with pytest.raises(ValueError):
        FetchLimits(allowed_networks=("not-a-network",))
    with pytest.raises(ValueError):
        FetchLimits(max_redirects=-1)
    assert FetchLimits().max_bytes("video") == 100 * 1024 * 1024


# ---------------------------------------------------------------------- a real server on 127.0.0.1


@dataclass
class LocalServer:
    port: int
    stop: threading.Event
    seen: list[tuple[str, str]] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def make_handler(server: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            server.seen.append((self.path, self.headers.get("Host", "")))
            path, _, query = self.path.partition("?")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.route(path, urllib.parse.parse_qs(query))

        def route(self, path: str, query: dict[str, list[str]]) -> None:
            fixed = {
                "/png": ("image/png", PNG),
                "/mp4": ("video/mp4", MP4),
                "/jpeg-octet": ("application/octet-stream", JPEG),
                "/junk-octet": ("application/octet-stream", b"just some text"),
                "/html": ("text/html; charset=utf-8", b"<html></html>"),
                "/mp4-as-png": ("image/png", MP4),
            }
            if path in fixed:
                self.reply(200, *fixed[path])
            elif path == "/redirect":
                self.redirect(query["to"][0])
            elif path.startswith("/chain/"):
                hops = int(path.rsplit("/", 1)[1])
                self.redirect(f"/chain/{hops - 1}") if hops else self.reply(200, "image/png", PNG)
            else:
                getattr(self, "route_" + path.strip("/").replace("-", "_"), self.not_found)()

        def reply(self, status: int, mime: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def not_found(self) -> None:
            self.reply(404, "text/plain", b"not found")

        def route_big_stream(self) -> None:  # no Content-Length: only the running cap can stop it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)
            for _ in range(64):
                self.wfile.write(bytes(16384))

        def route_big_length(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(PNG)
            server.stop.wait(5)

        def route_stall(self) -> None:
            server.stop.wait(5)

        def route_drip(self) -> None:  # each read is quick; only a total timeout ends it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)
            while not server.stop.wait(0.05):
                self.wfile.write(b"\x00")
                self.wfile.flush()

    return Handler


@pytest.fixture(scope="module")
def local_server() -> Iterator[LocalServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    httpd.daemon_threads = True
    server = LocalServer(port=httpd.server_address[1], stop=threading.Event())
    httpd.RequestHandlerClass = make_handler(server)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with build_media_client(FetchLimits()) as media_client:
        yield media_client


LOCAL = FetchLimits(allow_private=True, fetch_timeout_seconds=5)
# A public-looking name that resolves to the test server; only 127.0.0.1 is opened, the guard stays on.
PINNED = FetchLimits(allowed_networks=("127.0.0.1/32",), fetch_timeout_seconds=5)


def pinned_resolver() -> FakeResolver:
    return FakeResolver({"media.test": ["127.0.0.1"], "internal.test": ["10.0.0.1"]})


async def test_fetch_success(local_server: LocalServer, client: httpx.AsyncClient) -> None:
    assert await resolve_media(local_server.url("/png"), "image", client, LOCAL) == PNG
    assert await resolve_media(local_server.url("/mp4"), "video", client, LOCAL) == MP4
    assert await resolve_media(local_server.url("/jpeg-octet"), "image", client, LOCAL) == JPEG


async def test_fetch_by_name_connects_to_pinned_ip(
    local_server: LocalServer, client: httpx.AsyncClient
) -> None:
    resolver = pinned_resolver()
    url = local_server.url("/png?n=pinned", host="media.test")
    assert await resolve_media(url, "image", client, PINNED, resolver=resolver) == PNG
    assert resolver.calls == ["media.test"]
    assert ("/png?n=pinned", f"media.test:{local_server.port}") in local_server.seen


async def test_local_server_refused_without_allow_private(
    local_server: LocalServer, client: httpx.AsyncClient
) -> None:
    seen = len(local_server.seen)
    with pytest.raises(ForbiddenMediaAddress):
        await resolve_media(local_server.url("/png"), "image", client, FetchLimits())
    assert len(local_server.seen) == seen


@pytest.mark.parametrize(
    ("path", "kind", "error", "message"),
    [
        ("/html", "image", InvalidMediaContent, "'text/html' is not an image"),
        ("/mp4-as-png", "image", InvalidMediaContent, "looks like video/mp4"),
        ("/junk-octet", "image", InvalidMediaContent, "not a recognised image"),
        ("/png", "video", InvalidMediaContent, "is not a video"),
        ("/missing", "image", MediaFetchError, "HTTP 404"),
    ],
)
async def test_fetch_refusals(
    local_server: LocalServer,
    client: httpx.AsyncClient,
    path: str,
    kind: media.MediaKind,
    error: type[MediaError],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        await resolve_media(local_server.url(path), kind, client, LOCAL)


@pytest.mark.parametrize("path", ["/big-stream", "/big-length"])
async def test_size_cap(local_server: LocalServer, client: httpx.AsyncClient, path: str) -> None:
    limits = FetchLimits(allow_private=True, max_image_bytes=100_000, fetch_timeout_seconds=5)
    started = time.monotonic()
    with pytest.raises(MediaTooLarge, match="100000 bytes"):
        await resolve_media(local_server.url(path), "image", client, limits)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("path", ["/stall", "/drip"])
async def test_total_timeout(local_server: LocalServer, client: httpx.AsyncClient, path: str) -> None:
    limits = FetchLimits(allow_private=True, fetch_timeout_seconds=0.4)
    started = time.monotonic()
    with pytest.raises(MediaFetchError, match=r"timed out after 0\.4s"):
        await resolve_media(local_server.url(path), "image", client, limits)
    assert time.monotonic() - started < 2


async def test_connection_refused(client: httpx.AsyncClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(MediaFetchError, match=r"could not fetch media from '127\.0\.0\.1'"):
        await resolve_media(f"http://127.0.0.1:{port}/png", "image", client, LOCAL)


async def test_redirects_followed(local_server: LocalServer, client: httpx.AsyncClient) -> None:
    relative = local_server.url("/redirect?to=" + urllib.parse.quote("/png"))
    assert await resolve_media(relative, "image", client, LOCAL) == PNG
    limits = FetchLimits(allow_private=True, max_redirects=3, fetch_timeout_seconds=5)
    assert await resolve_media(local_server.url("/chain/3"), "image", client, limits) == PNG
    with pytest.raises(MediaFetchError, match="too many redirects"):
        await resolve_media(local_server.url("/chain/4"), "image", client, limits)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("http://internal.test/cat.png", ForbiddenMediaAddress),
        ("http://10.1.2.3/cat.png", ForbiddenMediaAddress),
        ("http://169.254.169.254/latest/meta-data/iam", ForbiddenMediaAddress),
        ("http://[::1]/", ForbiddenMediaAddress),
        ("http://localhost:{port}/png", ForbiddenMediaAddress),
        ("file:///etc/passwd", UnsupportedMediaURL),
    ],
)
async def test_redirect_targets_are_checked(
    local_server: LocalServer, client: httpx.AsyncClient, target: str, error: type[MediaError]
) -> None:
    resolver = pinned_resolver()
    location = urllib.parse.quote(target.format(port=local_server.port), safe="")
    url = local_server.url(f"/redirect?to={location}", host="media.test")
    seen = len(local_server.seen)
    with pytest.raises(error):
        await resolve_media(url, "image", client, PINNED, resolver=resolver)
    assert len(local_server.seen) == seen + 1  # only the first hop reached the server
    assert set(resolver.calls) <= {"media.test", "internal.test"}


# ------------------------------------------------------------------ TLS: SNI and certificate by name


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    openssl = require_binary("openssl")  # fails in CI when absent, like every real component
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"]
    command += ["-addext", f"subjectAltName=DNS:{name}"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@dataclass
class TlsServer:
    port: int
    cert: Path
    server_names: list[str | None]


@pytest.fixture(scope="module")
def tls_server(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"), "media.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server_names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(local_server))
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield TlsServer(port=httpd.server_address[1], cert=cert, server_names=server_names)
    httpd.shutdown()
    httpd.server_close()


async def test_https_pinned_ip_keeps_sni_and_certificate_name(tls_server: TlsServer) -> None:
    trust = ssl.create_default_context(cafile=str(tls_server.cert))
    async with httpx.AsyncClient(verify=trust, trust_env=False) as client:
        url = f"https://media.test:{tls_server.port}/png"
        assert await resolve_media(url, "image", client, PINNED, resolver=pinned_resolver()) == PNG
    assert tls_server.server_names[-1] == "media.test"


async def test_https_certificate_is_checked_against_the_original_name(tls_server: TlsServer) -> None:
    trust = ssl.create_default_context(cafile=str(tls_server.cert))
    resolver = FakeResolver({"impostor.test": ["127.0.0.1"]})
    async with httpx.AsyncClient(verify=trust, trust_env=False) as client:
        with pytest.raises(MediaFetchError, match=r"could not fetch media from 'impostor\.test'"):
            url = f"https://impostor.test:{tls_server.port}/png"
            await resolve_media(url, "image", client, PINNED, resolver=resolver)
