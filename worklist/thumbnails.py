"""Thumbnails made by the scorer's own fetch and decode, so that the page can never make the worklist fetch
what the scorer would refuse."""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict

import anyio
from anyio import to_thread
from PIL import Image

from streaming.decode import DecodeLimits, decode_image
from streaming.errors import CxrError, ErrorCode, FetchError
from streaming.fetch import FetchPolicy, fetch


def thumbnail_png(image: Image.Image, size: int) -> bytes:
    """A PNG whose longest side is at most `size`: small enough for a list, enough to recognise the film."""
    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def refusal_status(exc: CxrError) -> int:
    """404 for an image that is not there or not allowed or not decodable; 502 for a server that failed us."""
    failed_upstream = {ErrorCode.FETCH_FAILED, ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT}
    return 502 if isinstance(exc, FetchError) and exc.code in failed_upstream else 404


class Thumbnails:
    """Small PNGs of the studies' images, fetched and decoded by the scorer's own code under the scorer's own
    policy (allowed roots, allowed DICOMweb hosts, size limits): the page can never make the worklist fetch
    what the scorer would refuse. Bounded in time, in concurrency, and in memory (an LRU of recent ones)."""

    def __init__(
        self,
        policy: FetchPolicy,
        limits: DecodeLimits,
        *,
        size: int = 256,
        deadline_s: float = 10.0,
        concurrency: int = 4,
        cache_entries: int = 128,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.size = size
        self.deadline_s = deadline_s
        self.concurrency = concurrency
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None

    def cached(self, uri: str) -> bytes | None:
        with self._lock:
            png = self._cache.get(uri)
            if png is not None:
                self._cache.move_to_end(uri)
            return png

    def render(self, uri: str) -> bytes:
        """Fetch, decode and shrink one image (blocking: run it in a worker thread). Raises `CxrError`."""
        png = self.cached(uri)
        if png is not None:
            return png
        data = fetch(uri, self.policy, time.monotonic() + self.deadline_s)
        png = thumbnail_png(decode_image(data, self.limits, draft_size=(self.size, self.size)), self.size)
        with self._lock:
            self._cache[uri] = png
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return png

    async def get(self, uri: str) -> bytes:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        return await to_thread.run_sync(self.render, uri, limiter=self._limiter)
