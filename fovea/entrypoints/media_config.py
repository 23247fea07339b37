"""MediaConfig: every limit the server puts on the media clients send, in one validated place.

`fovea serve` builds it from its flags (`--max-media-bytes`, `--allowed-media-domains`, ...; each field's
flag is its name with dashes); the README's serving section lists them. Offline `LLM` users are trusted and
get none of these (they may read any local path, and nothing is fetched over the network there).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True, frozen=True)
class MediaConfig:
    max_media_bytes: int = 20 * 1024 * 1024
    """Largest image or video a request may carry (data: URL) or make the server fetch or read (413 above)."""
    media_fetch_timeout_s: float = 10.0
    """Time limit of each http(s) fetch, the whole download with its redirects (a slow drip cannot hold it)."""
    allowed_local_media_path: str | None = None
    """Directory whose files requests may name (file:// URLs or paths); None: no local files."""
    allowed_media_domains: tuple[str, ...] | None = None
    """Hosts (names or IP literals) http(s) media may come from, every redirect hop included; a listed host
    may be on a private address. None: any host whose addresses are all public."""
    allow_private_media_urls: bool = False
    """Fetch from any address, loopback, private and link-local (cloud metadata) included: only on a
    trusted network."""
    max_image_pixels: int = 64_000_000
    """Largest image, width x height from the file's header, checked before decoding (an 8K photo is 33 Mpx;
    Pillow's own bomb limit is ~179 Mpx)."""
    max_video_frame_pixels: int = 3840 * 2160
    """Largest video frame, width x height from the container's header (4K)."""
    max_video_frames: int = 14_400
    """Most frames a video file may hold (10 minutes at 24 fps). Only the sampled frames are decoded (from
    the keyframe before each), but the file's packets are all read to find them."""
    max_video_decoded_bytes: int = 2 * 1024**3
    """Most memory a video's kept frames may take decoded: kept frames x width x height x 3 bytes, from the
    header and the model's frame sampling, checked before decoding (Qwen2.5-VL keeps up to 768 frames: of a 4K
    video, 19 GB). 2 GiB holds 768 frames of 1280 x 720, or 86 of 4K."""
    max_concurrent_media_decodes: int = 2
    """Images and video headers decoded at the same time; more requests wait their turn (a burst of large
    images cannot exhaust memory)."""
    media_ca_bundle: str | None = None
    """PEM file of the certificate authorities https media servers are checked against (a private CA); None:
    the CAs httpx trusts by default (certifi's). The certificate is always checked against the URL's host name."""

    def __post_init__(self) -> None:
        for name in ("max_media_bytes", "max_image_pixels", "max_video_frame_pixels", "max_video_frames",
                     "max_video_decoded_bytes", "max_concurrent_media_decodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.media_fetch_timeout_s > 0:
            raise ValueError(f"media_fetch_timeout_s must be > 0, got {self.media_fetch_timeout_s}")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path).resolve()
            if not root.is_dir():
                raise ValueError(f"allowed_local_media_path={self.allowed_local_media_path!r} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", str(root))
        if self.media_ca_bundle is not None and not Path(self.media_ca_bundle).is_file():
            raise ValueError(f"media_ca_bundle={self.media_ca_bundle!r} is not a file")
        if self.allowed_media_domains is not None:
            if isinstance(self.allowed_media_domains, str):
                raise ValueError("allowed_media_domains must be a list of host names, not one string")
            domains = tuple(d.strip().strip("[]").lower().rstrip(".") for d in self.allowed_media_domains)
            bad = [d for d in domains if not d or "/" in d or ":" in d and d.count(":") < 2]
            if bad:
                raise ValueError(f"allowed_media_domains takes bare host names or IP literals (no scheme, port "
                                 f"or path), got {bad}")
            object.__setattr__(self, "allowed_media_domains", domains)

    @classmethod
    def from_kwargs(cls, **kwargs) -> MediaConfig:
        """Like the constructor, but an unknown option is an error listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown media option(s) {unknown}; valid: {', '.join(names)}")
        return cls(**kwargs)
