"""Downloads for the update agent: a rate limit shared by metadata and models, the fetcher TUF's
client uses, and resumable target downloads (an HTTP Range request continues a `.part` file that an
earlier, interrupted run left; a server that ignores Range sends the whole file again)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

CHUNK = 64 * 1024


class RateLimit:
    """A token bucket of `bytes_per_s` (0: no limit), with at most one second of burst."""

    def __init__(self, bytes_per_s: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = bytes_per_s
        self._clock = clock
        self._tokens = float(bytes_per_s)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate) - n
            self._at = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class Fetcher(FetcherInterface):
    """urllib3 with a timeout and the shared rate limit; an HTTP error status is TUF's DownloadHTTPError."""

    def __init__(self, limit: RateLimit, timeout_s: float) -> None:
        self.limit = limit
        self.pool = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s), retries=False)

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self.pool.request("GET", url, preload_content=False)
        if response.status != 200:
            response.release_conn()
            raise tuf_errors.DownloadHTTPError(f"HTTP {response.status}", response.status)
        return self._chunks(response)

    def _chunks(self, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            for chunk in response.stream(CHUNK):
                self.limit.take(len(chunk))
                yield chunk
        finally:
            response.release_conn()

    def resume(self, url: str, part: Path, length: int) -> int:
        """Fetch `url` into `part` until it holds `length` bytes, continuing what is there; returns the
        bytes downloaded now. DownloadError when the server fails or sends more than `length`."""
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        if have == length:
            return 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = self.pool.request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_errors.DownloadError(f"cannot reach the update repository ({type(exc).__name__})") from None
        got = 0
        try:
            if response.status == 200:
                have = 0  # Range not honoured: the whole file again
            elif response.status != 206:
                raise tuf_errors.DownloadHTTPError(f"HTTP {response.status}", response.status)
            with open(part, "ab" if have else "wb") as fh:
                for chunk in response.stream(CHUNK):
                    if have + got + len(chunk) > length:
                        raise tuf_errors.DownloadLengthMismatchError(f"more than the signed {length} bytes")
                    self.limit.take(len(chunk))
                    fh.write(chunk)
                    got += len(chunk)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_errors.DownloadError(f"download interrupted ({type(exc).__name__})") from None
        finally:
            response.release_conn()
        return got
