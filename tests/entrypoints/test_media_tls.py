"""https media through the pinned connection: the fetcher connects to the checked IP, yet the TLS handshake sends
the URL's host name (SNI) and the certificate is checked against that name with the operator's CA bundle
(--media-ca-bundle). Certificates are made here with the openssl command line; a loopback HTTPS server serves
them; a test resolver maps the names to 127.0.0.1."""
from __future__ import annotations

import contextlib
import http.server
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_errors import MediaRefusedError
from fovea.entrypoints.media_fetch import MediaFetcher
from tests.entrypoints import QuietHTTPServer

BODY = b"pixels" * 100
NAME = "media.test"


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """ca.pem (a test CA), and media.test / other.test leaf certificates (.pem + .key) signed by it."""
    folder = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=fovea test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=folder)
    for name in (NAME, "other.test"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        (folder / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                                            f"extendedKeyUsage=serverAuth\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder


@contextlib.contextmanager
def https_server(cert: Path, key: Path, sni_seen: list):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args):
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: sni_seen.append(name)
    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def fetcher(certs: Path | None, **options) -> MediaFetcher:
    """Media hosts resolve to 127.0.0.1 (listed in allowed_media_domains, so a loopback address is allowed)."""
    config = MediaConfig(allowed_media_domains=(NAME, "127.0.0.1"),
                         media_ca_bundle=str(certs / "ca.pem") if certs else None, **options)
    return MediaFetcher(config, resolver=lambda host, port: ["127.0.0.1"])


def test_the_certificate_is_checked_against_the_host_name_sent_as_sni(certs):
    sni_seen: list = []
    with https_server(certs / f"{NAME}.pem", certs / f"{NAME}.key", sni_seen) as port:
        assert fetcher(certs)(f"https://{NAME}:{port}/clip.mp4") == BODY
        assert sni_seen == [NAME]  # the name, though the connection went to 127.0.0.1
        with pytest.raises(MediaRefusedError, match="TLS failed .*unable to get local issuer") as info:
            fetcher(None)(f"https://{NAME}:{port}/clip.mp4")  # a CA the server was not told to trust
        assert info.value.reason == "tls_failed"
        with pytest.raises(MediaRefusedError, match="TLS failed .*(mismatch|not valid for '127.0.0.1')"):
            fetcher(certs)(f"https://127.0.0.1:{port}/clip.mp4")  # the IP is not the certificate's name


def test_a_certificate_for_another_name_is_refused(certs):
    sni_seen: list = []
    with https_server(certs / "other.test.pem", certs / "other.test.key", sni_seen) as port:
        with pytest.raises(MediaRefusedError, match=f"TLS failed .*not valid for '{NAME}'") as info:
            fetcher(certs)(f"https://{NAME}:{port}/clip.mp4")
        assert info.value.reason == "tls_failed"
        assert sni_seen == [NAME]


def test_the_ca_bundle_must_be_a_file(tmp_path):
    with pytest.raises(ValueError, match="media_ca_bundle=.* is not a file"):
        MediaConfig(media_ca_bundle=str(tmp_path / "missing.pem"))
