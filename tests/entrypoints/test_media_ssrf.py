"""The fetcher's address policy: non-public addresses refused by default, on every redirect hop, and checked on the
address actually connected to. Host names resolve through an injected resolver (no real DNS); the only server
contacted is a loopback one, and refusals of other addresses happen before any connection is attempted."""
from __future__ import annotations

import http.server
import ipaddress
import threading
import urllib.parse

import httpx
import pytest

from fovea.entrypoints.media_addresses import MediaURLRefusedError, is_public_address, pick_address
from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_fetch import MediaFetcher

BODY = b"media bytes"

NOT_PUBLIC = ["127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
              "100.64.0.1", "100.127.255.254", "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1",
              "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
              "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "64:ff9b::a00:1",
              "2002:a00:1::1", "2001:db8::1"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address):
    assert is_public_address(ipaddress.ip_address(address))


def _resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise AssertionError(f"unexpected resolution of {host!r}")
        return table[host]
    return resolve


def test_pick_address_checks_every_resolved_address():
    resolve = _resolver({"mixed.test": ["93.184.216.34", "10.0.0.1"], "meta.test": ["169.254.169.254"],
                         "public.test": ["93.184.216.34"]})
    kwargs = dict(allowed_domains=None, allow_private=False, resolver=resolve)
    assert str(pick_address("public.test", 80, **kwargs)) == "93.184.216.34"
    with pytest.raises(MediaURLRefusedError, match="resolves to 10.0.0.1"):
        pick_address("mixed.test", 80, **kwargs)  # one private answer is enough: DNS can answer either
    with pytest.raises(MediaURLRefusedError, match="169.254.169.254.*--allow-private-media-urls"):
        pick_address("meta.test", 80, **kwargs)
    with pytest.raises(MediaURLRefusedError, match="not a public address"):
        pick_address("[::ffff:127.0.0.1]", 80, **kwargs)  # an IP literal needs no resolution
    assert str(pick_address("meta.test", 80, allowed_domains=None, allow_private=True,
                            resolver=resolve)) == "169.254.169.254"
    listed = frozenset({"meta.test"})
    assert str(pick_address("META.test.", 80, allowed_domains=listed, allow_private=False,
                            resolver=resolve)) == "169.254.169.254"
    with pytest.raises(MediaURLRefusedError, match="not in --allowed-media-domains"):
        pick_address("public.test", 80, allowed_domains=listed, allow_private=False, resolver=resolve)


@pytest.fixture(scope="module")
def server():
    """Loopback server: /media, /redirect?to=URL; records the path and Host header of every request."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Host", "")))
            if self.path.startswith("/redirect"):
                target = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["to"][0]
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], seen
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_connections(monkeypatch):
    """Fail the test if the fetcher sends anything: a refusal must come before any connection."""
    def send(*args, **kwargs):
        raise AssertionError("the fetcher tried to connect")
    monkeypatch.setattr(httpx.Client, "send", send)


def test_default_refuses_loopback_without_connecting(server):
    port, seen = server
    before = len(seen)
    for url in (f"http://127.0.0.1:{port}/media", f"http://[::1]:{port}/media",
                f"http://[::ffff:127.0.0.1]:{port}/media", f"http://localhost:{port}/media"):
        fetch = MediaFetcher(resolver=_resolver({"localhost": ["127.0.0.1", "::1"]}))
        with pytest.raises(MediaURLRefusedError, match="not a public address"):
            fetch(url)
    assert len(seen) == before  # the loopback server never heard from the fetcher
    assert MediaFetcher(MediaConfig(allow_private_media_urls=True))(f"http://127.0.0.1:{port}/media") == BODY


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/admin",
                                 "https://[fd00::1]/x", "http://metadata.test/computeMetadata/v1/",
                                 "http://100.100.100.200/latest/meta-data"])
def test_metadata_and_private_refused_before_connecting(url, no_connections):
    fetch = MediaFetcher(resolver=_resolver({"metadata.test": ["169.254.169.254"]}))
    with pytest.raises(MediaURLRefusedError):
        fetch(url)


def test_connects_to_the_checked_address(server):
    """'media.test' exists in no real DNS: the fetch can only succeed by connecting to the address the injected
    resolver gave and the check passed, sending the name as the Host header (no second lookup)."""
    port, seen = server
    calls: list[str] = []
    fetch = MediaFetcher(MediaConfig(allowed_media_domains=("media.test",)),
                         resolver=_resolver({"media.test": ["127.0.0.1"]}, calls))
    assert fetch(f"http://media.test:{port}/media") == BODY
    assert calls == ["media.test"]
    assert seen[-1] == ("/media", f"media.test:{port}")


def test_every_redirect_hop_is_checked(server):
    port, seen = server
    table = {"media.test": ["127.0.0.1"], "inside.test": ["10.1.2.3"]}
    fetch = MediaFetcher(MediaConfig(allowed_media_domains=("media.test",)), resolver=_resolver(table))
    base = f"http://media.test:{port}"
    assert fetch(f"{base}/redirect?to=/media") == BODY  # a relative hop on the listed host
    for target in (f"http://127.0.0.1:{port}/media", "http://inside.test/media", "http://169.254.169.254/"):
        before = len(seen)
        with pytest.raises(MediaURLRefusedError, match="not in --allowed-media-domains"):
            fetch(f"{base}/redirect?to={urllib.parse.quote(target)}")
        assert [path for path, _ in seen[before:]] == [f"/redirect?to={urllib.parse.quote(target)}"]
    with pytest.raises(ValueError, match="only http"):
        fetch(f"{base}/redirect?to={urllib.parse.quote('file:///etc/passwd')}")

    # without an allow-list: the first hop public (pretend), the second private
    public = MediaFetcher(resolver=_resolver({"public.test": ["93.184.216.34"], "inside.test": ["10.1.2.3"]}))
    with pytest.raises(MediaURLRefusedError, match="inside.test"):
        public._pinned_request(httpx.Client(), "http://inside.test/media")
    assert str(public._pinned_request(httpx.Client(), "http://public.test/a").url) == "http://93.184.216.34/a"


def test_too_many_redirects(server):
    port, _ = server
    fetch = MediaFetcher(MediaConfig(allow_private_media_urls=True))
    url = f"http://127.0.0.1:{port}/media"
    for _ in range(7):
        url = f"http://127.0.0.1:{port}/redirect?to={urllib.parse.quote(url)}"
    with pytest.raises(ValueError, match="more than 5 redirects"):
        fetch(url)


def test_config_validation():
    with pytest.raises(ValueError, match="bare host names"):
        MediaConfig(allowed_media_domains=("http://a.test/",))
    with pytest.raises(ValueError, match="bare host names"):
        MediaConfig(allowed_media_domains=("a.test:8080",))
    with pytest.raises(ValueError, match="not one string"):
        MediaConfig(allowed_media_domains="a.test")
    assert MediaConfig(allowed_media_domains=("A.test.", "[::1]")).allowed_media_domains == ("a.test", "::1")
    with pytest.raises(ValueError, match="max_image_pixels must be >= 1"):
        MediaConfig(max_image_pixels=0)
    with pytest.raises(ValueError, match="unknown media option.*valid: max_media_bytes"):
        MediaConfig.from_kwargs(max_pixels=3)
