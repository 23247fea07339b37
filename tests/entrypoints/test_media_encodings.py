"""A compressed body (Content-Encoding: gzip / deflate) is capped by its decompressed size, and inflated a bounded
piece at a time: a few kilobytes that inflate to gigabytes are cut off at --max-media-bytes with the process's
peak memory barely moving."""
from __future__ import annotations

import gzip
import http.server
import json
import subprocess
import sys
import zlib

import pytest

from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_errors import MediaRefusedError
from fovea.entrypoints.media_fetch import MediaFetcher, MediaTooLargeError
from tests.entrypoints import ROOT, loopback_http_server

CAP = 1_000_000
PAYLOAD = bytes(range(256)) * 2000  # 512 kB: under the cap, compressed or not


def gzip_of_zeros(num_bytes: int) -> bytes:
    """gzip of `num_bytes` zeros, compressed piece by piece (never holding them): ~1 KB per MB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(num_bytes >> 20)]
    return b"".join(parts) + compressor.flush()


BOMB = gzip_of_zeros(256 << 20)  # 256 MiB of zeros in ~250 kB
SMALL_BOMB = gzip_of_zeros(8 << 20)  # 8 MiB in ~8 kB: over the cap after decompression only


@pytest.fixture(scope="module")
def base_url():
    bodies = {"/gzip": ("gzip", gzip.compress(PAYLOAD)), "/deflate": ("deflate", zlib.compress(PAYLOAD)),
              "/small-bomb": ("gzip", SMALL_BOMB), "/bomb": ("gzip", BOMB), "/brotli": ("br", b"\x00" * 10),
              "/truncated": ("gzip", gzip.compress(PAYLOAD)[:-100]), "/plain": ("identity", PAYLOAD)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            encoding, body = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with loopback_http_server(Handler) as url:
        yield url


def fetcher() -> MediaFetcher:
    return MediaFetcher(MediaConfig(allow_private_media_urls=True, max_media_bytes=CAP))


def test_compressed_bodies_are_decoded_and_capped_after_decompression(base_url):
    fetch = fetcher()
    for path in ("/gzip", "/deflate", "/plain"):
        assert fetch(base_url + path) == PAYLOAD, path
    assert len(SMALL_BOMB) < CAP  # its Content-Length passes: only the decompressed size is over
    with pytest.raises(MediaTooLargeError, match=f"cap of {CAP} bytes .*once decompressed") as info:
        fetch(base_url + "/small-bomb")
    assert info.value.reason == "body_too_large"
    with pytest.raises(MediaRefusedError, match="Content-Encoding 'br'; the server decodes gzip, x-gzip, deflate"):
        fetch(base_url + "/brotli")
    with pytest.raises(MediaRefusedError, match="bad gzip body: the compressed body ended early"):
        fetch(base_url + "/truncated")


# In a fresh process, so its peak RSS (VmHWM, reset first) is the bomb's fetch alone.
_PROBE = """
import json, sys
from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_fetch import MediaFetcher, MediaTooLargeError

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

fetch = MediaFetcher(MediaConfig(allow_private_media_urls=True, max_media_bytes=int(sys.argv[2])))
fetch(sys.argv[1].replace("/bomb", "/gzip"))  # warm-up: first-use imports and allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
try:
    fetch(sys.argv[1])
    error = None
except MediaTooLargeError as err:
    error = str(err)
print(json.dumps({"error": error, "rss_growth_kib": status_kib("VmHWM") - before}))
"""


def test_a_gzip_bomb_is_cut_off_without_inflating_it(base_url):
    """256 MiB of zeros sent as ~250 kB of gzip: refused at the 1 MB cap; the fetch adds a few MB at most to the
    peak RSS (the body so far, and pieces of at most the cap inflated), not the 256 MiB inflating it would."""
    done = subprocess.run([sys.executable, "-c", _PROBE, base_url + "/bomb", str(CAP)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["error"] is not None and "once decompressed" in result["error"], result
    assert result["rss_growth_kib"] < 32 * 1024, result


def test_the_fetcher_offers_only_the_encodings_it_decodes(base_url):
    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Accept-Encoding"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    seen: list = []
    with loopback_http_server(Recorder) as url:
        assert fetcher()(url + "/x") == b"ok"
    assert seen == ["gzip, deflate"]
