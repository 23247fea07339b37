"""Fetch the media a client points at (`image_url`, `video_url`) as bytes, within the server's `MediaConfig`.

- `data:` URLs are decoded here, so their size is capped like any other.
- `http://` and `https://` URLs are downloaded within `media_fetch_timeout_s` for the whole fetch, redirects
  included (a server that drips bytes cannot hold a request open), and stop as soon as the body passes
  `max_media_bytes` (a Content-Length over the cap is refused before reading). Each hop's host is checked by
  `media_addresses.pick_address` (public addresses only, unless allowed) and the connection goes to the very
  address checked: the URL's host is replaced by that IP, with the name kept in the Host header and TLS SNI
  (so certificates are still verified against the name). Redirects are followed here, hop by hop, so a
  public server cannot bounce the fetch to a private one.
- `file://` URLs are read only under `allowed_local_media_path` (after resolving symlinks and `..`), and only
  when the server was given one; anything else is refused.

The engine never sees the URL itself: `load_image` reads plain strings as local paths, so handing it a client's
string would let the client read the server's files. Errors are ValueErrors (400); `MediaTooLargeError` is 413.
"""
from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fovea.entrypoints.media_addresses import Resolver, pick_address, system_resolver
from fovea.entrypoints.media_config import MediaConfig
from fovea.multimodal.media import _parse_data_url

_MAX_REDIRECTS = 5
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_MAX_SHOWN_CHARS = 80


class MediaTooLargeError(ValueError):
    """The media is larger than the server's cap (HTTP 413)."""


@dataclass(slots=True)
class MediaFetcher:
    """`fetcher(url) -> bytes`; one per server, shared by all requests (it holds no connection state).
    `resolver` turns a host name into addresses (the system's DNS; tests inject their own)."""

    config: MediaConfig = field(default_factory=MediaConfig)
    resolver: Resolver = system_resolver

    @property
    def allowed_local_media_path(self) -> str | None:
        return self.config.allowed_local_media_path

    def __call__(self, url: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise ValueError("a media URL must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            _, data = _parse_data_url(url)
            self._check_size(len(data), url)
            return data
        if scheme in ("http", "https"):
            return self._fetch_http(url)
        if scheme == "file":
            return self._read_local(url)
        raise ValueError(f"unsupported media URL {_shorten(url)}: use a data:, http(s):// or file:// URL")

    def _check_size(self, num_bytes: int, url: str) -> None:
        if num_bytes > self.config.max_media_bytes:
            raise MediaTooLargeError(f"media {_shorten(url)} is {num_bytes} bytes, over the server's cap of "
                                     f"{self.config.max_media_bytes} bytes (--max-media-bytes)")

    def _fetch_http(self, url: str) -> bytes:
        timeout_s = self.config.media_fetch_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            # trust_env=False: a proxy from the environment would connect to the name, not the checked address
            with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
                for _ in range(_MAX_REDIRECTS + 1):
                    request = self._pinned_request(client, url)
                    response = client.send(request, stream=True)
                    try:
                        if response.status_code in _REDIRECT_CODES and "location" in response.headers:
                            url = urllib.parse.urljoin(url, response.headers["location"])
                            if url.split(":", 1)[0].lower() not in ("http", "https"):
                                raise ValueError(f"media redirected to {_shorten(url)}: only http(s) is followed")
                            continue
                        return self._read_body(response, url, deadline)
                    finally:
                        response.close()
                raise ValueError(f"fetching {_shorten(url)}: more than {_MAX_REDIRECTS} redirects")
        except httpx.TimeoutException as err:
            raise ValueError(f"fetching {_shorten(url)} timed out after {timeout_s} s") from err
        except httpx.HTTPError as err:
            raise ValueError(f"could not fetch {_shorten(url)}: {err}") from err

    def _pinned_request(self, client: httpx.Client, url: str) -> httpx.Request:
        """A GET of `url` addressed to its host's checked IP, the name kept for Host and SNI."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as err:
            raise ValueError(f"malformed media URL {_shorten(url)}: {err}") from err
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        address = pick_address(parsed.host, port, allowed_domains=self._allowed_domains(),
                               allow_private=self.config.allow_private_media_urls, resolver=self.resolver)
        pinned = parsed.copy_with(host=str(address))
        name = f"[{parsed.host}]" if ":" in parsed.host else parsed.host  # an IPv6 literal keeps its brackets
        host_header = name if parsed.port is None else f"{name}:{parsed.port}"
        return client.build_request("GET", pinned, headers={"Host": host_header},
                                    extensions={"sni_hostname": parsed.host})

    def _allowed_domains(self) -> frozenset[str] | None:
        domains = self.config.allowed_media_domains
        return None if domains is None else frozenset(domains)

    def _read_body(self, response: httpx.Response, url: str, deadline: float) -> bytes:
        if response.status_code != 200:
            raise ValueError(f"fetching {_shorten(url)} gave HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit():
            self._check_size(int(declared), url)
        chunks, num_bytes = [], 0
        for chunk in response.iter_bytes():
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("deadline passed")
            num_bytes += len(chunk)
            if num_bytes > self.config.max_media_bytes:
                raise MediaTooLargeError(f"media {_shorten(url)} is over the server's cap of "
                                         f"{self.config.max_media_bytes} bytes (--max-media-bytes)")
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
            raise ValueError(f"file URL {_shorten(url)} names a host; only local files are read")
        return self.read_local_path(urllib.parse.unquote(parsed.path))

    def read_local_path(self, path: str) -> bytes:
        if self.allowed_local_media_path is None:
            raise ValueError("local files are refused: the server was started without --allowed-local-media-path")
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.allowed_local_media_path):
            raise ValueError(f"local file {_shorten(path)} is outside --allowed-local-media-path")
        if not resolved.is_file():
            raise ValueError(f"local file {_shorten(path)}: no such file")
        self._check_size(resolved.stat().st_size, path)
        return resolved.read_bytes()


def _shorten(text: str) -> str:
    return repr(text) if len(text) <= _MAX_SHOWN_CHARS else repr(text[:_MAX_SHOWN_CHARS]) + f"... ({len(text)} chars)"
