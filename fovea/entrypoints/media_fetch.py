"""Fetch the media a client points at (`image_url`, `video_url`) as bytes, within limits the server sets.

- `data:` URLs are decoded here, so their size is capped like any other.
- `http://` and `https://` URLs are downloaded within `timeout_s` for the whole fetch (a server that drips
  bytes cannot hold a request open) and stop as soon as the body passes `max_bytes` (a Content-Length over
  the cap is refused before reading).
- `file://` URLs are read only under `allowed_local_media_path` (after resolving symlinks and `..`), and only
  when the server was given one; anything else is refused.

The engine never sees the URL itself: `load_image` reads plain strings as local paths, so handing it a client's
string would let the client read the server's files. Errors are ValueErrors (400); `MediaTooLargeError` is 413.
"""
from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

from fovea.multimodal.media import _parse_data_url

DEFAULT_MAX_MEDIA_BYTES = 20 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT_S = 10.0
_MAX_REDIRECTS = 5
_MAX_SHOWN_CHARS = 80


class MediaTooLargeError(ValueError):
    """The media is larger than the server's cap (HTTP 413)."""


@dataclass(slots=True)
class MediaFetcher:
    """`fetcher(url) -> bytes`; one per server, shared by all requests (it holds no connection state)."""

    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    allowed_local_media_path: str | None = None

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path).resolve()
            if not root.is_dir():
                raise ValueError(f"allowed_local_media_path={self.allowed_local_media_path!r} is not a directory")
            self.allowed_local_media_path = str(root)

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
        if num_bytes > self.max_bytes:
            raise MediaTooLargeError(f"media {_shorten(url)} is {num_bytes} bytes, over the server's cap of "
                                     f"{self.max_bytes} bytes (--max-media-bytes)")

    def _fetch_http(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        try:
            with httpx.Client(timeout=self.timeout_s, follow_redirects=True, max_redirects=_MAX_REDIRECTS) as client:
                with client.stream("GET", url) as response:
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
                        if num_bytes > self.max_bytes:
                            raise MediaTooLargeError(f"media {_shorten(url)} is over the server's cap of "
                                                     f"{self.max_bytes} bytes (--max-media-bytes)")
                        chunks.append(chunk)
        except httpx.TimeoutException as err:
            raise ValueError(f"fetching {_shorten(url)} timed out after {self.timeout_s} s") from err
        except httpx.HTTPError as err:
            raise ValueError(f"could not fetch {_shorten(url)}: {err}") from err
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
