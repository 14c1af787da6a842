"""A streaming writer of uncompressed (``ZIP_STORED``) zips with a compact directory (PKWARE APPNOTE 6.3).

:class:`StoredZipWriter` is how :func:`sims.data.convert.convert_folder` writes EDM-format zips of
any size (zip64 records from 65,535 entries or 4 GiB on) keeping ~45 bytes per entry;
:func:`write_dataset` writes a data set (zip or folder) atomically through it.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from array import array
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

_ZIP64_COUNT_LIMIT = 0xFFFF  # module constants so a test can force the zip64 records on a small zip
_ZIP64_OFFSET_LIMIT = 0xFFFFFFFF
_DOS_DATE, _DOS_TIME = (0 << 9) | (1 << 5) | 1, 0  # 1980-01-01 00:00: the same input gives the same bytes


class StoredZipWriter:
    """Write an uncompressed (``ZIP_STORED``) zip keeping 24 bytes + the name per entry, not a Python object.

    :class:`zipfile.ZipFile` keeps a ``ZipInfo`` (~450 bytes) per entry until ``close()``: ~600 MB
    for ImageNet's 1.28 M images. This writer keeps offsets, sizes and CRC-32s in :mod:`array`
    arrays and the names in one ``bytearray``, and writes standard PKZIP records (APPNOTE 6.3):
    local headers, the central directory and, from 65,535 entries or 4 GiB on, the zip64 end records
    and zip64 extra fields (read by :mod:`zipfile`, ``unzip``, EDM's loader). Every entry is dated
    1980-01-01 00:00, so the bytes depend only on the contents.

    Args:
        f: a binary file opened for writing, seekable (for :meth:`write_streamed`).
    """

    def __init__(self, f) -> None:
        self.f = f
        self.pos = f.tell()
        self._offsets = array("Q")
        self._sizes = array("I")  # entries are < 4 GiB (checked)
        self._crcs = array("I")
        self._name_ends = array("Q")
        self._names = bytearray()

    def _header(self, name: bytes, crc: int, size: int) -> bytes:
        flags = 0 if name.isascii() else 0x800  # bit 11: UTF-8 names
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, 0, _DOS_TIME, _DOS_DATE, crc, size, size,
                           len(name), 0) + name

    def _record(self, name: bytes, offset: int, crc: int, size: int) -> None:
        if size >= 0xFFFFFFFF:
            raise ValueError(f"zip entry {name!r} is {size} bytes; entries must be < 4 GiB")
        self._offsets.append(offset)
        self._sizes.append(size)
        self._crcs.append(crc)
        self._names += name
        self._name_ends.append(len(self._names))

    def writestr(self, name: str, data: bytes) -> None:
        """Add one entry ``name`` with contents ``data`` (stored)."""
        bname = name.encode("utf-8")
        crc = zlib.crc32(data) & 0xFFFFFFFF
        head = self._header(bname, crc, len(data))
        self.f.write(head)
        self.f.write(data)
        self._record(bname, self.pos, crc, len(data))
        self.pos += len(head) + len(data)

    def write_streamed(self, name: str, chunks: Iterator[bytes]) -> None:
        """Add one entry from an iterator of byte chunks (header patched with CRC and size afterwards)."""
        bname = name.encode("utf-8")
        start = self.pos
        self.f.write(self._header(bname, 0, 0))
        crc, size = 0, 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            self.f.write(chunk)
        end = self.f.tell()
        self.f.seek(start)
        self.f.write(self._header(bname, crc & 0xFFFFFFFF, size))
        self.f.seek(end)
        self._record(bname, start, crc & 0xFFFFFFFF, size)
        self.pos = end

    def close(self) -> None:
        """Write the central directory and the end records (the file itself is the caller's to close)."""
        cd_start = self.pos
        n = len(self._offsets)
        start = 0
        for i in range(n):
            name = bytes(self._names[start:self._name_ends[i]])
            start = self._name_ends[i]
            off = self._offsets[i]
            extra = b""
            if off >= _ZIP64_OFFSET_LIMIT:
                extra = struct.pack("<HHQ", 0x0001, 8, off)
                off = 0xFFFFFFFF
            version = 45 if extra else 20
            flags = 0 if name.isascii() else 0x800
            rec = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | version, version, flags, 0, _DOS_TIME,
                              _DOS_DATE, self._crcs[i], self._sizes[i], self._sizes[i], len(name), len(extra), 0,
                              0, 0, (0o100644 << 16) & 0xFFFFFFFF, off)
            self.f.write(rec + name + extra)
            self.pos += len(rec) + len(name) + len(extra)
        cd_size = self.pos - cd_start
        if n >= _ZIP64_COUNT_LIMIT or cd_start >= _ZIP64_OFFSET_LIMIT or cd_size >= _ZIP64_OFFSET_LIMIT:
            eocd64 = self.pos
            self.f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
            self.f.write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            n16, cd_size32, cd_start32 = min(n, 0xFFFF), min(cd_size, 0xFFFFFFFF), min(cd_start, 0xFFFFFFFF)
        else:
            n16, cd_size32, cd_start32 = n, cd_size, cd_start
        self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n16, n16, cd_size32, cd_start32, 0))
        self.f.flush()


Member = Union[bytes, Iterable[bytes]]


def write_dataset(out: Path, emit: Callable[[Callable[[str, Member], None]], None]) -> None:
    """Write a data set atomically as a ``*.zip`` (uncompressed, :class:`StoredZipWriter`) or a folder.

    ``emit(put)`` calls ``put(name, data)`` once per member (``name`` a relative POSIX path such as
    ``00000/img00000000.png``; ``data`` bytes or an iterable of byte chunks). Everything is written
    under a temporary name beside ``out`` and renamed onto it at the end, replacing what was there:
    an error or a kill leaves the old output (or none) and no half-written one.

    Raises:
        whatever ``emit`` raises (the temporary output is removed).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".zip":
        from sims.utils import atomic_write

        def write_zip(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                zw = StoredZipWriter(f)
                emit(lambda name, data: zw.writestr(name, data) if isinstance(data, bytes)
                     else zw.write_streamed(name, iter(data)))
                zw.close()

        if out.is_dir():
            shutil.rmtree(out)
        atomic_write(out, write_zip)
        return

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        def put(name: str, data: Member) -> None:
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                for chunk in ([data] if isinstance(data, bytes) else data):
                    f.write(chunk)

        emit(put)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
