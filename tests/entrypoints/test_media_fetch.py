"""MediaFetcher against a loopback HTTP server and a temporary directory: caps, timeouts, local-path rules.

The loopback server is reachable only because these tests allow private addresses (`fetcher` below);
test_media_ssrf.py checks that the default refuses it."""
from __future__ import annotations

import base64
import http.server
import time

import pytest

from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_errors import MediaRefusedError
from fovea.entrypoints.media_fetch import MediaFetcher, MediaTooLargeError
from tests.entrypoints import loopback_http_server


def fetcher(**options) -> MediaFetcher:
    return MediaFetcher(MediaConfig(allow_private_media_urls=True, **options))


SMALL = b"x" * 1000
BIG = b"y" * 5000


@pytest.fixture(scope="module")
def http_base():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                time.sleep(1.0)  # longer than the fetcher's timeout below
            if self.path == "/chunked-big":  # no Content-Length: the cap must hold while reading
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"3e8\r\n" + b"z" * 1000 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                return
            if self.path == "/drip":  # each byte within the timeout, the whole body not
                self.send_response(200)
                self.send_header("Content-Length", "8")
                self.end_headers()
                for _ in range(8):
                    self.wfile.write(b"d")
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            if self.path in ("/redirect", "/redirect-ftp", "/loop"):
                self.send_response(302)
                self.send_header("Location", {"/redirect": "/small", "/redirect-ftp": "ftp://127.0.0.1/a.png",
                                              "/loop": "/loop"}[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = {"/small": SMALL, "/big": BIG, "/slow": SMALL}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    with loopback_http_server(Handler) as base_url:
        yield base_url


def test_http_fetch_with_cap_and_timeout(http_base):
    fetch = fetcher(max_media_bytes=2000, media_fetch_timeout_s=0.3)
    assert fetch(http_base + "/small") == SMALL
    assert fetch(http_base + "/redirect") == SMALL
    with pytest.raises(MediaTooLargeError, match="2000 bytes"):
        fetch(http_base + "/big")  # refused from Content-Length
    with pytest.raises(MediaTooLargeError):
        fetch(http_base + "/chunked-big")  # refused while reading
    with pytest.raises(ValueError, match="HTTP 404"):
        fetch(http_base + "/missing")
    with pytest.raises(ValueError, match="timed out"):
        fetch(http_base + "/slow")
    with pytest.raises(ValueError, match="timed out"):
        fetch(http_base + "/drip")


def test_data_urls_are_capped():
    fetch = fetcher(max_media_bytes=2000)
    assert fetch("data:image/png;base64," + base64.b64encode(SMALL).decode()) == SMALL
    with pytest.raises(MediaTooLargeError):
        fetch("data:image/png;base64," + base64.b64encode(BIG).decode())
    assert fetch.resolve_item("data:image/png;base64," + base64.b64encode(SMALL).decode()) == SMALL


def test_local_files_only_under_the_allowed_directory(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(SMALL)
    (allowed / "big.png").write_bytes(BIG)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (allowed / "link.png").symlink_to(tmp_path / "secret.txt")

    with pytest.raises(ValueError, match="allowed-local-media-path"):
        fetcher()(f"file://{allowed / 'a.png'}")
    fetch = fetcher(max_media_bytes=2000, allowed_local_media_path=str(allowed))
    assert fetch(f"file://{allowed / 'a.png'}") == SMALL
    assert fetch.resolve_item(str(allowed / "a.png")) == SMALL
    for outside in (tmp_path / "secret.txt", allowed / ".." / "secret.txt", allowed / "link.png"):
        with pytest.raises(ValueError, match="outside"):
            fetch.resolve_item(str(outside))
    with pytest.raises(MediaTooLargeError):
        fetch(f"file://{allowed / 'big.png'}")
    with pytest.raises(ValueError, match="names a host"):
        fetch(f"file://example.com{allowed / 'a.png'}")
    with pytest.raises(ValueError, match="unsupported media URL"):
        fetch("ftp://example.com/a.png")
    with pytest.raises(ValueError, match="not a directory"):
        MediaConfig(allowed_local_media_path=str(tmp_path / "nope"))


def test_every_refusal_names_its_reason(http_base, tmp_path):
    fetch = fetcher(max_media_bytes=2000, media_fetch_timeout_s=0.3, allowed_local_media_path=str(tmp_path))
    cases = {http_base + "/big": "body_too_large", http_base + "/slow": "timeout",
             http_base + "/missing": "fetch_failed", "http://127.0.0.1:9/none": "fetch_failed",
             http_base + "/redirect-ftp": "bad_redirect", http_base + "/loop": "bad_redirect",
             "ftp://example.com/a.png": "bad_url", "data:image/png;base64,%%%": "bad_url", "http://[zz/": "bad_url",
             "file:///etc/passwd": "local_file_refused"}
    for url, reason in cases.items():
        with pytest.raises(MediaRefusedError) as info:
            fetch(url)
        assert info.value.reason == reason, (url, str(info.value))
    strict = MediaFetcher(MediaConfig(allowed_media_domains=("media.test",)))
    for url in ("http://127.0.0.1/a.png", "http://10.0.0.1/a.png"):
        with pytest.raises(MediaRefusedError) as info:
            strict(url)
        assert info.value.reason == "domain_not_allowed", url
    with pytest.raises(MediaRefusedError) as info:
        MediaFetcher()("http://169.254.169.254/latest/meta-data/")
    assert info.value.reason == "private_address"
