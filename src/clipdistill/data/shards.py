"""Tar shards as pools: WebDataset-style archives (`pool-{000..099}.tar`, each member one file,
images among captions and metadata), the form web-scale image sets are passed around in.

Indexing streams each shard once with Python's `tarfile` in stream mode (gzip, bzip2 and xz
shards too, whatever their suffix; nothing extracted to disk): every image member's bytes are
hashed and test-decoded like a folder's files. Only one member is in memory at a time, and never
one larger than `images.MAX_FILE_BYTES`: such a member is listed as broken and skipped over
unread (a 2 GB member once cost 4.7 GB of memory to index). A shard that breaks off (truncated,
cut at a member boundary without the end-of-archive blocks, garbage after some members) keeps
the members before the break; the break itself is listed.

A member is then named by its place, not its name: `Member(shard, name, offset, size)` with the
offset of its data in the (decompressed) archive, which the index records. `read_member` reads
those bytes back: one `pread` for a plain tar, a seek in a decompressing reader kept open per
process for a compressed one (the stores read a shard's members in order, so each process
decompresses a shard about once). No table of names is built: two members with the same name
are two images, a truncated shard serves the members before the break, and nothing depends on
parsing `SHARD::MEMBER` text (a folder file may be called `a.tar::y.png`)."""

from __future__ import annotations

import bz2
import collections
import gzip
import lzma
import os
import re
import tarfile
import threading
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from ..core.errors import ConfigError
from .images import MAX_FILE_BYTES, UnreadableImage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SEP = "::"  # "SHARD::MEMBER" is how a member is shown (its identity is Member's offset)
_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's reserved keys (__key__, __url__): never images


class Member(NamedTuple):
    """One member of one shard, by where its bytes are (`offset` into the decompressed archive)."""

    shard: str
    name: str
    offset: int
    size: int


def is_shard_spec(spec: str | os.PathLike) -> bool:
    s = os.fspath(spec)
    return s.endswith(SHARD_SUFFIXES) or ("{" in s and any(x in s for x in SHARD_SUFFIXES))


def expand(spec: str | os.PathLike) -> list[Path]:
    """`pool-{000..099}.tar` -> the shard files (brace expansion as webdataset does), each checked."""
    from braceexpand import braceexpand

    shards = [Path(s) for s in braceexpand(os.fspath(spec))]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise ConfigError(f"--pool {spec}: {len(missing)} of its {len(shards)} shard(s) are not files (first: "
                          f"{missing[0]}); give existing .tar files, e.g. shards/pool-{{000..009}}.tar")
    return shards


def locator(shard: str | os.PathLike, member: str) -> str:
    """How a member is shown: `SHARD::MEMBER` (for display; `Member` is what reads it)."""
    return f"{os.fspath(shard)}{SEP}{member}"


class _Header(tarfile.TarInfo):
    """A TarInfo that remembers how the archive ended: tarfile ends its iteration silently on a
    missing or truncated header (a shard cut at a member boundary looks complete), and only the
    two zero blocks of the end-of-archive marker mean it really is complete."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.clipdistill_end = e
            raise


# What breaks a shard's bytes (final) as against its reading (an I/O error: tried again).
_BAD_BYTES = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, ValueError)


class Streamed(NamedTuple):
    """One item of `stream_members`: an image member with its bytes, a member left unread
    (`data` None, `error` why), or the shard's break (`member` None, `error` why; `again` when it
    was the reading that failed, not the bytes)."""

    member: Optional[Member]
    data: Optional[bytes]
    error: Optional[str]
    again: bool = False


def stream_members(shard: Path, limit: int = MAX_FILE_BYTES) -> Iterator[Streamed]:
    """The image members of `shard` in archive order, read as a stream, one at a time; a member
    over `limit` bytes is skipped over unread. A shard that breaks off ends with its break."""
    real = os.fspath(shard)
    try:
        # tarfile's default 10 KB buffer, not more: it decompresses a whole buffer at once, and 1 MB
        # of gzipped zeros is 1 GB
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_Header) as tf:
            for info in tf:
                tf.members = []  # a stream keeps every header otherwise: memory grows with the shard
                name = info.name
                if not info.isreg() or _META.match(name) or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                member = Member(real, name, info.offset_data, info.size)
                if info.size > limit:
                    yield Streamed(member, None, f"a member of {info.size} bytes, over the {limit}-byte limit for "
                                                 f"one image; skipped unread")
                    continue
                yield Streamed(member, tf.extractfile(info).read(), None)
            end = getattr(tf, "clipdistill_end", None)
            if end is not None and not isinstance(end, tarfile.EOFHeaderError):
                yield Streamed(None, None, f"the shard breaks off ({end}): no end-of-archive marker")
    except _BAD_BYTES as e:
        yield Streamed(None, None, f"{type(e).__name__}: {str(e)[:150]}")
    except OSError as e:
        yield Streamed(None, None, f"cannot be read ({type(e).__name__}: {e.strerror or e})", again=True)


_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
_OPENER: dict[tuple, object] = {}  # (shard, size, mtime) -> its decompressing opener, None for a plain tar
_OPEN: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()  # the same -> an open reader
_OPEN_PID = os.getpid()
_OPEN_LOCK = threading.Lock()
_KEEP_OPEN = 8  # decompressing readers kept per process (the stores read shards one after another)


def _reader(shard: str):
    """A decompressing reader of `shard` for this process, or None for a plain tar. Kept open
    (a few per process, last used first) so that members read in order decompress it once;
    keyed by the shard's size and mtime too, so a shard replaced meanwhile is opened afresh."""
    global _OPEN_PID
    if _OPEN_PID != os.getpid():  # a forked worker: the parent's readers share its file offsets
        _OPEN.clear()
        _OPEN_PID = os.getpid()
    st = os.stat(shard)
    key = (shard, st.st_size, st.st_mtime_ns)
    f = _OPEN.get(key)
    if f is not None:
        _OPEN.move_to_end(key)
        return f
    if key not in _OPENER:
        with open(shard, "rb") as raw:
            magic = raw.read(6)
        _OPENER[key] = next((o for m, o in _COMPRESSED if magic.startswith(m)), None)
    opener = _OPENER[key]
    if opener is None:
        return None
    f = opener(shard, "rb")
    _OPEN[key] = f
    while len(_OPEN) > _KEEP_OPEN:
        _OPEN.popitem(last=False)[1].close()
    return f


def read_member(member: Member, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of one member, read at its offset (one pread for a plain tar). OSError when
    they cannot all be read (the shard shrank, an I/O error)."""
    shard, name, offset, size = member
    if size > limit:
        raise UnreadableImage(f"a member of {size} bytes, over the {limit}-byte limit for one image; not read")
    with _OPEN_LOCK:
        f = _reader(shard)
        if f is not None:
            try:
                f.seek(offset)
                data = f.read(size)
            except _BAD_BYTES as e:  # the compressed stream is damaged where it was not when indexed
                for key in [k for k in _OPEN if k[0] == shard]:
                    _OPEN.pop(key).close()
                raise OSError(f"{shard}: cannot read member {name} ({type(e).__name__}: {e})") from None
    if f is None:
        fd = os.open(shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
    if len(data) != size:
        raise OSError(f"{shard} ends inside member {name} ({len(data)} of {size} bytes): the shard changed since "
                      f"it was indexed")
    return data
