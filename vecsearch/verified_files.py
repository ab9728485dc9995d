"""Reading an indexed file back for display: only bytes proven to be the content that was indexed.

A path in the images table is only a hint. Whoever can write in an indexed folder can replace a
file after the load, for instance with a symbolic link to a private file given the same size and
mtime. So the gallery, thumbnails and contact sheets never trust a path's metadata: they read the
bytes, hash them, and use them only if the sha256 is the one `vecsearch load` stored. A link
planted since the load cannot pass that test unless it leads to the very content that was indexed.

Hashing a file costs a read; `Verified` remembers which (device, inode, size, mtime, ctime)
already hashed right, so a cached thumbnail is served without reading the original again. The
ctime cannot be set back from user space, so an edit in place never reuses a verification.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

from .errors import NotFound

CACHE_ENTRIES = 4096
CHUNK = 1 << 20  # what streaming a file holds at a time (twice: the chunk sent, the one held back)


def _changed(image_id: int, path: str) -> NotFound:
    return NotFound(f"the file of image {image_id} changed since it was loaded: {path}; run "
                    "`vecsearch load` on its folder again")


def _open(image_id: int, path: str, size: int) -> tuple[int, os.stat_result]:
    try:
        # O_NONBLOCK: a FIFO planted in the file's place cannot hang the request.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise NotFound(f"the file of image {image_id} is gone: {path} ({e.strerror})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        os.close(fd)
        raise _changed(image_id, path)
    return fd, st


def _read_all(fd: int, size: int) -> bytes:
    chunks, left = [], size + 1  # one byte more than expected: a file that grew does not match
    while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Verified:
    """Reads indexed files back, checking their sha256; thread-safe."""

    def __init__(self) -> None:
        self._ok: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, image_id: int, path: str, sha256: str, size: int) -> bytes:
        """The file's bytes, if they are exactly the indexed content; else NotFound.

        The hash is computed on the bytes returned, whatever the cache says.
        """
        fd, st = _open(image_id, path, size)
        try:
            data = _read_all(fd, size)
        finally:
            os.close(fd)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise _changed(image_id, path)
        self._remember(st, sha256)
        return data

    def stream(self, image_id: int, path: str, sha256: str, size: int) -> Stream:
        """The file's bytes in chunks (see Stream), or NotFound before any is sent.

        Unless this very file version hashed right before, the open file is hashed first, a
        chunk at a time: a symbolic link to a private file planted since the load must not get a
        single byte out. The same descriptor is then read again to send it, hashed once more.
        """
        fd, st = _open(image_id, path, size)
        try:
            with self._lock:
                known = self._ok.get(_key(st)) == sha256
            if not known:
                digest = hashlib.sha256()
                while chunk := os.read(fd, CHUNK):
                    digest.update(chunk)
                if digest.hexdigest() != sha256:
                    raise _changed(image_id, path)
                os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return Stream(self, fd, st, (image_id, path, sha256, size))

    def check(self, image_id: int, path: str, sha256: str, size: int) -> None:
        """NotFound unless the file holds the indexed content (hashed once per file version)."""
        fd, st = _open(image_id, path, size)
        os.close(fd)
        with self._lock:
            if self._ok.get(_key(st)) == sha256:
                self._ok.move_to_end(_key(st))
                return
        self.read(image_id, path, sha256, size)

    def _remember(self, st: os.stat_result, sha256: str) -> None:
        with self._lock:
            self._ok[_key(st)] = sha256
            while len(self._ok) > CACHE_ENTRIES:
                self._ok.popitem(last=False)


class Stream:
    """An indexed file's bytes, CHUNK at a time, never more in memory. The last chunk is held back
    until the whole content has hashed to the indexed sha256 again: a file edited in place while it
    is being sent never reaches its end, the iteration raising NotFound instead (a response with
    its length declared then ends short). `close` is safe to call more than once and
    runs `on_close` once (the web server releases its download slot there)."""

    def __init__(self, verified: Verified, fd: int, st: os.stat_result, row: tuple) -> None:
        self._verified, self._fd, self._st, self._row = verified, fd, st, row
        self.size = row[3]
        self.on_close: Callable[[], None] | None = None

    def __iter__(self) -> Iterator[bytes]:
        image_id, path, sha256, size = self._row
        digest, held, left = hashlib.sha256(), b"", size + 1  # a file that grew does not match
        try:
            while left > 0 and self._fd is not None and (chunk := os.read(self._fd, min(left, CHUNK))):
                digest.update(chunk)
                left -= len(chunk)
                if held:
                    yield held
                held = chunk
            if left != 1 or digest.hexdigest() != sha256:
                raise _changed(image_id, path)
            self._verified._remember(self._st, sha256)
            yield held
        finally:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


def _key(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
