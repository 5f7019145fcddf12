"""Tar shards as pools: WebDataset-style archives (`pool-{000..099}.tar`, each member one file,
images among captions and metadata), the form web-scale image sets are passed around in.

Indexing streams each shard once with the `webdataset` library (never a whole shard in
memory, no extraction to disk): every image member's bytes are hashed and test-decoded like a
folder's files. A single image is then read back by its place in the archive (`read_member`:
one seek and one read, through a per-process table of member offsets built from the tar
headers), which is what the pixel store and the embedding cache do, in parallel workers."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Iterator, Optional

from ..core.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
SEP = "::"  # "SHARD::MEMBER" names one member of one shard


def is_shard_spec(spec: str | os.PathLike) -> bool:
    s = os.fspath(spec)
    return s.endswith(".tar") or ("{" in s and ".tar" in s)


def expand(spec: str | os.PathLike) -> list[Path]:
    """`pool-{000..099}.tar` -> the shard files (brace expansion as webdataset does), each checked."""
    from braceexpand import braceexpand

    shards = [Path(s) for s in braceexpand(os.fspath(spec))]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise ConfigError(f"--pool {spec}: {len(missing)} of its {len(shards)} shard(s) are not files (first: "
                          f"{missing[0]}); give existing .tar files, e.g. shards/pool-{{000..009}}.tar")
    return shards


def locator(shard: Path, member: str) -> str:
    return f"{os.fspath(shard)}{SEP}{member}"


def split_locator(loc: str) -> Optional[tuple[str, str]]:
    shard, sep, member = loc.partition(SEP)
    return (shard, member) if sep and shard.endswith(".tar") else None


def stream_members(shard: Path) -> Iterator[tuple[Optional[str], Optional[bytes], Optional[str]]]:
    """(member name, bytes, None) for each image member of `shard`, in archive order, read as a
    stream; a shard that breaks off (truncated, not a tar) ends with (None, None, why)."""
    from webdataset.tariterators import tar_file_iterator

    def _raise(exn: Exception) -> bool:
        raise exn

    try:
        with open(shard, "rb") as f:
            for sample in tar_file_iterator(f, handler=_raise,
                                            select_files=lambda n: n.lower().endswith(IMAGE_SUFFIXES)):
                yield sample["fname"], sample["data"], None
    except (tarfile.TarError, OSError, EOFError) as e:
        yield None, None, f"{type(e).__name__}: {str(e)[:150]}"


_OFFSETS: dict[tuple[str, int], dict[str, tuple[int, int]]] = {}


def read_member(loc: str) -> bytes:
    """The bytes of one member, by its offset in the archive (the table of offsets is read
    once per shard and process from the tar headers: no member data is read to build it)."""
    shard, member = split_locator(loc)
    key = (shard, os.getpid())
    table = _OFFSETS.get(key)
    if table is None:
        table = {}
        with tarfile.open(shard, "r:") as tf:
            for info in tf:
                if info.isreg():
                    table[info.name] = (info.offset_data, info.size)
        _OFFSETS[key] = table
    if member not in table:
        raise OSError(f"{member} is not in {shard} (the shard changed since it was indexed)")
    offset, size = table[member]
    with open(shard, "rb") as f:
        f.seek(offset)
        return f.read(size)
