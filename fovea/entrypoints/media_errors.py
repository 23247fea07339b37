"""Why the server refused a client's media: one error type per HTTP status, each with a short `reason`.

The reason is machine-readable and stable: `/metrics` counts refusals by it (`fovea_media_refused_total{reason}`),
so an operator can tell an attack (private addresses, bombs) from a misconfiguration (domains, certificates)
from slow or broken origins. The message is for the client and names the figure and the limit.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

REASONS = {
    "bad_url": "not a URL the server fetches (scheme, malformed, no host, unresolvable name)",
    "private_address": "the host is, or resolves to, a non-public address",
    "domain_not_allowed": "the host is not in --allowed-media-domains",
    "local_file_refused": "a local file outside --allowed-local-media-path, or local files not allowed",
    "bad_redirect": "a redirect to another scheme, or too many redirects",
    "timeout": "the fetch took longer than --media-fetch-timeout-s",
    "tls_failed": "the TLS handshake or the certificate check failed",
    "fetch_failed": "the origin answered with an error status, or the connection broke",
    "body_too_large": "the bytes (after any Content-Encoding) passed --max-media-bytes",
    "too_many_pixels": "an image over --max-image-pixels",
    "frame_too_large": "video frames over --max-video-frame-pixels",
    "too_many_frames": "a video with more frames than --max-video-frames",
    "decoded_bytes": "a video whose sampled frames would take more than --max-video-decoded-bytes",
    "undecodable": "the bytes are not an image or video that decodes",
}


class MediaRefusedError(ValueError):
    """Media the server does not take (HTTP 400)."""

    def __init__(self, message: str, *, reason: str):
        if reason not in REASONS:
            raise AssertionError(f"unknown media refusal reason {reason!r}; known: {', '.join(REASONS)}")
        super().__init__(message)
        self.reason = reason


class MediaTooLargeError(MediaRefusedError):
    """The media is larger than one of the server's limits (HTTP 413)."""


class MediaURLRefusedError(MediaRefusedError):
    """The URL's host or address is not one the server fetches from (HTTP 400)."""


def find_refusal(err: BaseException) -> MediaRefusedError | None:
    """The media refusal `err` is or wraps (chat parsing re-raises it with the message and part it came from)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MediaRefusedError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class MediaRefusals:
    """Refusals counted by reason since the server started; thread-safe (fetches run in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + 1

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """(reason, count) for every reason, zero included (so a dashboard sees the series before the first)."""
        with self._lock:
            counts = dict(self._counts)
        return iter([(reason, counts.get(reason, 0)) for reason in REASONS])
