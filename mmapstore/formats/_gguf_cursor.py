"""Bounded sequential reads of a GGUF header, and its key-value values.

:class:`HeaderCursor` reads through ``pread`` windows that never extend past
the end of the file or :data:`MAX_HEADER_NBYTES`; every length and count is
checked against the bytes that remain, and against a cap, before anything is
allocated.  Values come back as Python ``int``, ``float``, ``bool``, ``str``
and ``list``.
"""

from __future__ import annotations

import struct

import numpy as np

from .._errors import FormatError
from ._records import read_exact

__all__ = ["UINT32", "HeaderCursor"]

# Caps far beyond real files (a 256k-token vocabulary is ~10 MB of header)
# and far below a denial of service.
MAX_HEADER_NBYTES = 256 * 1024 * 1024
MAX_STRING_NBYTES = 64 * 1024 * 1024
MAX_ARRAY_ELEMS = 1 << 24
MAX_METADATA_ELEMS = 1 << 25  # over every array of one header
MAX_ARRAY_DEPTH = 4

_STRING, _ARRAY, _BOOL = 8, 9, 7
# value type -> (name, numpy dtype); strings, arrays and bools are handled apart.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("UINT8", "<u1"),
    1: ("INT8", "<i1"),
    2: ("UINT16", "<u2"),
    3: ("INT16", "<i2"),
    4: ("UINT32", "<u4"),
    5: ("INT32", "<i4"),
    6: ("FLOAT32", "<f4"),
    10: ("UINT64", "<u8"),
    11: ("INT64", "<i8"),
    12: ("FLOAT64", "<f8"),
}
UINT32 = 4
_U64 = struct.Struct("<Q")
_MIN_VALUE_NBYTES = {
    **{code: np.dtype(fmt).itemsize for code, (_, fmt) in _SCALARS.items()},
    _BOOL: 1,
    _STRING: 8,
    _ARRAY: 12,
}


class HeaderCursor:
    """Sequential reads over the header through bounded ``pread`` windows.

    A window never extends past the end of the file or the header cap; a read
    that needs bytes beyond either raises :class:`FormatError` with the
    offset.  Windows grow from 64 KiB so a small header costs one small read.
    """

    def __init__(self, fd: int, path: str, file_nbytes: int) -> None:
        self.fd = fd
        self.path = path
        self.file_nbytes = file_nbytes
        self.limit = min(file_nbytes, MAX_HEADER_NBYTES)
        self.offset = 0
        self._window = b""
        self._window_offset = 0
        self._window_nbytes = 64 * 1024
        self.metadata_elems = 0

    @property
    def remaining(self) -> int:
        return self.limit - self.offset

    def take(self, nbytes: int, what: str) -> tuple[bytes, int]:
        """``nbytes`` bytes at the cursor as (window, start index in it); advance."""
        end = self.offset + nbytes
        if end > self.limit:
            if end > self.file_nbytes:
                raise FormatError(
                    f"{self.path}: truncated while reading {what} at offset {self.offset}: needs {nbytes} bytes, "
                    f"the {self.file_nbytes} byte file ends {self.file_nbytes - self.offset} bytes later"
                )
            raise FormatError(
                f"{self.path}: header runs past the {MAX_HEADER_NBYTES} byte limit while reading {what} "
                f"at offset {self.offset}"
            )
        if end > self._window_offset + len(self._window):
            size = min(max(nbytes, self._window_nbytes), self.limit - self.offset)
            self._window = read_exact(self.fd, size, self.offset, path=self.path, what=what)
            self._window_offset = self.offset
            self._window_nbytes = min(self._window_nbytes * 2, 4 * 1024 * 1024)
        start = self.offset - self._window_offset
        self.offset = end
        return self._window, start

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        window, start = self.take(size, what)
        value: int = struct.unpack_from(fmt, window, start)[0]
        return value

    def string(self, what: str, *, cap: int = MAX_STRING_NBYTES, empty_ok: bool = True) -> str:
        at = self.offset
        nbytes = self.unpack("<Q", f"{what} length")
        if nbytes == 0 and not empty_ok:
            raise FormatError(f"{self.path}: {what} at offset {at} is empty")
        if nbytes > cap:
            raise FormatError(f"{self.path}: {what} at offset {at} is {nbytes} bytes long, over the {cap} byte limit")
        if nbytes > self.remaining:
            raise FormatError(
                f"{self.path}: {what} at offset {at} claims {nbytes} bytes, only {self.remaining} remain in the file"
            )
        window, start = self.take(nbytes, what)
        try:
            return window[start : start + nbytes].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(
                f"{self.path}: {what} at offset {at} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None

    def value(self, value_type: int, what: str, depth: int = 0) -> object:
        if value_type in _SCALARS:
            _, fmt = _SCALARS[value_type]
            window, start = self.take(np.dtype(fmt).itemsize, what)
            return np.frombuffer(window, fmt, 1, start)[0].item()
        if value_type == _BOOL:
            return self._bools(1, what)[0]
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            return self._array(what, depth)
        raise FormatError(f"{self.path}: {what}: unknown value type {value_type} at offset {self.offset - 4}")

    def _bools(self, count: int, what: str) -> list[bool]:
        at = self.offset
        window, start = self.take(count, what)
        raw = np.frombuffer(window, np.uint8, count, start)
        if np.any(raw > 1):
            bad = int(np.argmax(raw > 1))
            raise FormatError(f"{self.path}: {what}: bool at offset {at + bad} is {int(raw[bad])}, expected 0 or 1")
        return [bool(item) for item in raw.tolist()]

    def _array(self, what: str, depth: int) -> list[object]:
        at = self.offset
        if depth >= MAX_ARRAY_DEPTH:
            raise FormatError(f"{self.path}: {what}: arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {at}")
        element_type = self.unpack("<I", f"{what} array type")
        count = self.unpack("<Q", f"{what} array length")
        if element_type not in _MIN_VALUE_NBYTES:
            raise FormatError(f"{self.path}: {what}: unknown array element type {element_type} at offset {at}")
        if count > MAX_ARRAY_ELEMS:
            raise FormatError(
                f"{self.path}: {what}: array at offset {at} claims {count} elements, over the {MAX_ARRAY_ELEMS} limit"
            )
        if count * _MIN_VALUE_NBYTES[element_type] > self.remaining:
            raise FormatError(
                f"{self.path}: {what}: array at offset {at} claims {count} elements of at least "
                f"{_MIN_VALUE_NBYTES[element_type]} bytes, only {self.remaining} bytes remain in the file"
            )
        self.metadata_elems += count
        if self.metadata_elems > MAX_METADATA_ELEMS:
            raise FormatError(f"{self.path}: {what}: metadata arrays hold over {MAX_METADATA_ELEMS} elements in all")
        if element_type in _SCALARS:
            _, fmt = _SCALARS[element_type]
            window, start = self.take(count * np.dtype(fmt).itemsize, what)
            values: list[object] = np.frombuffer(window, fmt, count, start).tolist()
            return values
        if element_type == _BOOL:
            return list(self._bools(count, what))
        if element_type == _STRING:
            return list(self._strings(count, what))
        return [self.value(element_type, f"{what}[{index}]", depth + 1) for index in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        # Vocabularies hold hundreds of thousands of strings: decode straight
        # from the window while it holds them; anything else (a window edge,
        # a bad length, bad UTF-8) goes through string() for its checks.
        strings: list[str] = []
        unpack = _U64.unpack_from
        for index in range(count):
            position = self.offset - self._window_offset
            window = self._window
            if position + 8 <= len(window):
                (nbytes,) = unpack(window, position)
                end = position + 8 + nbytes
                if nbytes <= MAX_STRING_NBYTES and end <= len(window):
                    try:
                        strings.append(window[position + 8 : end].decode("utf-8"))
                    except UnicodeDecodeError:
                        pass
                    else:
                        self.offset += 8 + nbytes
                        continue
            strings.append(self.string(f"{what}[{index}]"))
        return strings
