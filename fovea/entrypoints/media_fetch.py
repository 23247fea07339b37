"""Fetch the media a client points at (`image_url`, `video_url`) as bytes, within the server's `MediaConfig`.

- `data:` URLs are decoded here, so their size is capped like any other.
- `http://` and `https://` URLs are downloaded within `media_fetch_timeout_s` for the whole fetch, redirects
  included (a server that drips bytes cannot hold a request open), and stop as soon as the body passes
  `max_media_bytes` (a Content-Length over the cap is refused before reading). A gzip or deflate
  Content-Encoding is undone here, a bounded piece at a time, and the cap applies to the decompressed bytes: a
  20 KB body that inflates to gigabytes is cut off at the cap, never held whole. Each hop's host is checked by
  `media_addresses.pick_address` (public addresses only, unless allowed) and the connection goes to the very
  address checked: the URL's host is replaced by that IP, with the name kept in the Host header and TLS SNI
  (so certificates are still verified against the name, with certifi's CAs or `--media-ca-bundle`). Redirects are
  followed here, hop by hop, so a public server cannot bounce the fetch to a private one.
- `file://` URLs are read only under `allowed_local_media_path` (after resolving symlinks and `..`), and only
  when the server was given one; anything else is refused.

The engine never sees the URL itself: `load_image` reads plain strings as local paths, so handing it a client's
string would let the client read the server's files. Every refusal is a `MediaRefusedError` (400) with a
`reason` for /metrics; `MediaTooLargeError` is 413 (media_errors.py).
"""
from __future__ import annotations

import ssl
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import certifi
import httpx

from fovea.entrypoints.media_addresses import Resolver, pick_address, system_resolver
from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_errors import (  # noqa: F401  (MediaTooLargeError: importers name it here)
    MediaRefusals,
    MediaRefusedError,
    MediaTooLargeError,
    MediaURLRefusedError,
)
from fovea.multimodal.media import _parse_data_url

_MAX_REDIRECTS = 5
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_MAX_SHOWN_CHARS = 80


@dataclass(slots=True)
class MediaFetcher:
    """`fetcher(url) -> bytes`; one per server, shared by all requests (it holds no connection state).
    `resolver` turns a host name into addresses (the system's DNS; tests inject their own)."""

    config: MediaConfig = field(default_factory=MediaConfig)
    resolver: Resolver = system_resolver
    refusals: MediaRefusals = field(default_factory=MediaRefusals, init=False, repr=False)  # by reason: /metrics
    _tls: ssl.SSLContext | None = field(default=None, init=False, repr=False)  # built on the first https fetch

    @property
    def allowed_local_media_path(self) -> str | None:
        return self.config.allowed_local_media_path

    def __call__(self, url: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise MediaURLRefusedError("a media URL must be a non-empty string", reason="bad_url")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            try:
                _, data = _parse_data_url(url)
            except ValueError as err:
                raise MediaURLRefusedError(str(err), reason="bad_url") from err
            self._check_size(len(data), url)
            return data
        if scheme in ("http", "https"):
            return self._fetch_http(url)
        if scheme == "file":
            return self._read_local(url)
        raise MediaURLRefusedError(f"unsupported media URL {_shorten(url)}: use a data:, http(s):// or file:// URL",
                                   reason="bad_url")

    def _check_size(self, num_bytes: int, url: str) -> None:
        if num_bytes > self.config.max_media_bytes:
            raise MediaTooLargeError(f"media {_shorten(url)} is {num_bytes} bytes, over the server's cap of "
                                     f"{self.config.max_media_bytes} bytes (--max-media-bytes)",
                                     reason="body_too_large")

    def _fetch_http(self, url: str) -> bytes:
        timeout_s = self.config.media_fetch_timeout_s
        try:
            # trust_env=False: a proxy from the environment would connect to the name, not the checked address
            with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False,
                              verify=self._tls_context()) as client:
                # the clock starts here: the first client reads the CA file and imports httpx's transport
                deadline = time.monotonic() + timeout_s
                for _ in range(_MAX_REDIRECTS + 1):
                    request = self._pinned_request(client, url)
                    response = client.send(request, stream=True)
                    try:
                        if response.status_code in _REDIRECT_CODES and "location" in response.headers:
                            url = urllib.parse.urljoin(url, response.headers["location"])
                            if url.split(":", 1)[0].lower() not in ("http", "https"):
                                raise MediaRefusedError(f"media redirected to {_shorten(url)}: only http(s) is "
                                                        f"followed", reason="bad_redirect")
                            continue
                        return self._read_body(response, url, deadline)
                    finally:
                        response.close()
                raise MediaRefusedError(f"fetching {_shorten(url)}: more than {_MAX_REDIRECTS} redirects",
                                        reason="bad_redirect")
        except httpx.TimeoutException as err:
            raise MediaRefusedError(f"fetching {_shorten(url)} timed out after {timeout_s} s",
                                    reason="timeout") from err
        except httpx.HTTPError as err:
            if _is_tls_error(err):
                raise MediaRefusedError(f"could not fetch {_shorten(url)}: TLS failed ({_tls_detail(err)})",
                                        reason="tls_failed") from err
            raise MediaRefusedError(f"could not fetch {_shorten(url)}: {err}", reason="fetch_failed") from err

    def _tls_context(self) -> ssl.SSLContext:
        """Certificates checked against the URL's host name (sent as SNI: `_pinned_request`), trusting
        `--media-ca-bundle`, else the CAs httpx trusts by default (certifi's)."""
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=self.config.media_ca_bundle or certifi.where())
        return self._tls

    def _pinned_request(self, client: httpx.Client, url: str) -> httpx.Request:
        """A GET of `url` addressed to its host's checked IP, the name kept for Host and SNI."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as err:
            raise MediaURLRefusedError(f"malformed media URL {_shorten(url)}: {err}", reason="bad_url") from err
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        address = pick_address(parsed.host, port, allowed_domains=self._allowed_domains(),
                               allow_private=self.config.allow_private_media_urls, resolver=self.resolver)
        pinned = parsed.copy_with(host=str(address))
        name = f"[{parsed.host}]" if ":" in parsed.host else parsed.host  # an IPv6 literal keeps its brackets
        host_header = name if parsed.port is None else f"{name}:{parsed.port}"
        # Accept-Encoding: what _decoded_chunks undoes (httpx would also offer br and zstd when installed)
        headers = {"Host": host_header, "Accept-Encoding": "gzip, deflate"}
        return client.build_request("GET", pinned, headers=headers,
                                    extensions={"sni_hostname": parsed.host})

    def _allowed_domains(self) -> frozenset[str] | None:
        domains = self.config.allowed_media_domains
        return None if domains is None else frozenset(domains)

    def _read_body(self, response: httpx.Response, url: str, deadline: float) -> bytes:
        if response.status_code != 200:
            raise MediaRefusedError(f"fetching {_shorten(url)} gave HTTP {response.status_code}",
                                    reason="fetch_failed")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit():  # the encoded size: a compressed body may still inflate
            self._check_size(int(declared), url)
        chunks, num_bytes = [], 0
        for chunk in _decoded_chunks(response, url, max_chunk_bytes=self.config.max_media_bytes + 1):
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("deadline passed")
            num_bytes += len(chunk)
            if num_bytes > self.config.max_media_bytes:
                raise MediaTooLargeError(f"media {_shorten(url)} is over the server's cap of "
                                         f"{self.config.max_media_bytes} bytes (--max-media-bytes)"
                                         + (" once decompressed" if _content_encoding(response) else ""),
                                         reason="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def resolve_item(self, item: str) -> bytes:
        """Bytes for a media string that `chat_utils.parse_chat_messages` passed through as it is: a data URL,
        or a local path (which it does only when the server allows local media)."""
        if item[:5].lower() == "data:":
            return self(item)
        return self.read_local_path(item)

    def _read_local(self, url: str) -> bytes:
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaRefusedError(f"file URL {_shorten(url)} names a host; only local files are read",
                                    reason="local_file_refused")
        return self.read_local_path(urllib.parse.unquote(parsed.path))

    def read_local_path(self, path: str) -> bytes:
        if self.allowed_local_media_path is None:
            raise MediaRefusedError("local files are refused: the server was started without "
                                    "--allowed-local-media-path", reason="local_file_refused")
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.allowed_local_media_path):
            raise MediaRefusedError(f"local file {_shorten(path)} is outside --allowed-local-media-path",
                                    reason="local_file_refused")
        if not resolved.is_file():
            raise MediaRefusedError(f"local file {_shorten(path)}: no such file", reason="local_file_refused")
        self._check_size(resolved.stat().st_size, path)
        return resolved.read_bytes()


def _shorten(text: str) -> str:
    return repr(text) if len(text) <= _MAX_SHOWN_CHARS else repr(text[:_MAX_SHOWN_CHARS]) + f"... ({len(text)} chars)"


# Content-Encoding -> zlib's wbits for it (gzip: header and trailer; deflate: zlib-wrapped, as RFC 9110 says)
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _content_encoding(response: httpx.Response) -> str:
    encoding = response.headers.get("content-encoding", "").strip().lower()
    return "" if encoding == "identity" else encoding


def _decoded_chunks(response: httpx.Response, url: str, *, max_chunk_bytes: int) -> Iterator[bytes]:
    """The body with its Content-Encoding undone, in pieces of at most `max_chunk_bytes`: zlib inflates at most
    that much per call (a 64 KiB network chunk of a gzip bomb would otherwise inflate to ~64 MB at once, which is
    what httpx's own decoding does), so memory stays bounded by the cap whatever the compression ratio."""
    encoding = _content_encoding(response)
    if not encoding:
        yield from response.iter_raw()
        return
    if encoding not in _DECODERS:
        raise MediaRefusedError(f"fetching {_shorten(url)}: the origin sent Content-Encoding {encoding!r}; the "
                                f"server decodes {', '.join(_DECODERS)} or none", reason="fetch_failed")
    inflater = zlib.decompressobj(_DECODERS[encoding])
    try:
        for raw in response.iter_raw():
            while raw and not inflater.eof:
                yield inflater.decompress(raw, max_chunk_bytes)
                raw = inflater.unconsumed_tail
        if not inflater.eof:
            raise zlib.error("the compressed body ended early")
    except zlib.error as err:
        raise MediaRefusedError(f"fetching {_shorten(url)}: bad {encoding} body: {err}", reason="fetch_failed") from err


def _is_tls_error(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, ssl.SSLError):
            return True
        err = err.__cause__ or err.__context__
    return False


def _tls_detail(err: BaseException) -> str:
    while err is not None and not isinstance(err, ssl.SSLError):
        err = err.__cause__ or err.__context__
    return str(getattr(err, "verify_message", None) or err)
