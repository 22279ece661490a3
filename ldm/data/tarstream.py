"""Reading one tar shard into raw samples, surviving truncation and corruption.

A raw sample is the webdataset convention: ``{"__key__": str, "__url__": str, ext: data, ...}``
with members grouped by the part of the file name before the first dot of its basename
(``webdataset.tariterators.base_plus_ext``). Member data is a ``bytearray`` (``bytes`` for
streams without ``readinto``); both behave alike for decoding.

We parse the tar stream ourselves instead of using ``tarfile`` (which webdataset uses) for two
reasons: every failure must be attributed to a reason and counted, with the sample a truncation
cuts in half dropped rather than emitted (``tarfile`` silently stops at a truncated header), and
``tarfile``'s pure-Python header parsing costs ~0.2 ms per member, which dominated reading cached
latents. The parser handles POSIX ustar (with ``prefix``), pax extended headers (``x``: path and
size) and GNU long names (``L``); gzip/bzip2/xz compressed shards are detected by magic bytes.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from collections.abc import Iterator
from typing import IO, Any

from webdataset.tariterators import base_plus_ext

from ldm.data.counters import SkipCounter
from ldm.data.shards import open_url

RawSample = dict[str, Any]

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_META = re.compile(r"(^|/)__[^/]*__($|/)")
_REGULAR = (b"0", b"\0", b"7")


class TarFormatError(Exception):
    """The stream is not a valid tar (``bad_tar``) or ends early (``truncated``)."""

    def __init__(self, message: str, truncated: bool, member: str | None = None) -> None:
        super().__init__(message)
        self.truncated = truncated
        self.member = member


class _Prefixed:
    """Re-attach bytes already read (for magic sniffing) in front of a stream."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head = head
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        if len(data) < size:
            data += self.stream.read(size - len(data))
        return data

    def readinto(self, buffer: memoryview) -> int:
        if self.head or not hasattr(self.stream, "readinto"):
            data = self.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        return self.stream.readinto(buffer)


def _read_member(stream: Any, size: int) -> bytes | bytearray:
    """Read ``size`` bytes (fewer at EOF) into a writable buffer when the stream allows.

    A writable ``bytearray`` lets ``torch.frombuffer`` make zero-copy views of cached tensors
    without its non-writable-buffer warning; streams without ``readinto`` return bytes.
    """
    readinto = getattr(stream, "readinto", None)
    if readinto is None or size == 0:
        return _read_exact(stream, size)
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        count = readinto(view[done:])
        if not count:
            break
        done += count
    view.release()
    return buffer if done == size else buffer[:done]


def _read_exact(stream: Any, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _decompressed(stream: IO[bytes]) -> Any:
    """Wrap ``stream`` in a decompressor if it starts with gzip/bzip2/xz magic bytes."""
    head = _read_exact(stream, 6)
    source = _Prefixed(head, stream)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=source)  # type: ignore[arg-type]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(source)  # type: ignore[arg-type]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(source)  # type: ignore[arg-type]
    return source


def _field_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


#: Largest member we read into memory (a shard sample is an image, a caption or a latent).
MAX_MEMBER_BYTES = 1 << 30
#: Largest pax / GNU long-name header (they hold a path and a few numbers).
MAX_EXTENDED_BYTES = 1 << 20


def _field_int(raw: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80 positive, 0xff
    negative, both two's complement over the whole field)."""
    if raw[0] & 0x80:
        value = int.from_bytes(raw, "big", signed=raw[0] == 0xFF)
        return value if raw[0] == 0xFF else value - (0x80 << (8 * (len(raw) - 1)))
    text = raw.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records; any malformed one is a ``bad_tar``."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarFormatError("malformed pax record length", truncated=False)
        length = int(digits)
        end = pos + length
        if end <= space + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarFormatError(f"malformed pax record (length {length})", truncated=False)
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarFormatError("malformed pax record (no '=')", truncated=False)
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _checked_size(size: int, limit: int, what: str) -> int:
    if not 0 <= size <= limit:
        raise TarFormatError(f"{what} size {size} outside 0..{limit} bytes", truncated=False)
    return size


def iter_tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of the regular files in a (possibly compressed) tar stream.

    Raises:
        TarFormatError: Bad header/checksum, or data ending early (``truncated=True``,
            ``member`` set when a member's data was cut).
    """
    source = _decompressed(stream)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(source, _BLOCK)
        if len(header) < _BLOCK:
            detail = "truncated header" if header else "no end-of-archive marker"
            raise TarFormatError(detail, truncated=True)
        if header == _ZERO_BLOCK:
            return
        stored = header[148:156]
        checksum = sum(header[:148]) + sum(header[156:]) + 8 * 32
        try:
            if _field_int(stored) != checksum:
                raise TarFormatError("header checksum mismatch", truncated=False)
            size = _field_int(header[124:136])
        except ValueError as exc:
            raise TarFormatError(f"unparsable header ({exc})", truncated=False) from exc
        name = _field_str(header[0:100])
        if header[257:262] == b"ustar" and header[345] != 0:
            name = f"{_field_str(header[345:500])}/{name}"
        kind = header[156:157]
        if kind in (b"x", b"g", b"L"):
            _checked_size(size, MAX_EXTENDED_BYTES, "extended header")
            data = _read_exact(source, -(-size // _BLOCK) * _BLOCK)
            if len(data) < size:
                raise TarFormatError("truncated extended header", truncated=True)
            if kind == b"x":
                pax = _pax_records(data[:size])
            elif kind == b"L":
                long_name = _field_str(data[:size])
            continue
        name = pax.get("path", long_name or name)
        if "size" in pax:
            if not pax["size"].isdigit():
                raise TarFormatError(f"malformed pax size {pax['size'][:20]!r}", truncated=False)
            size = int(pax["size"])
        _checked_size(size, MAX_MEMBER_BYTES, f"member {name}")
        pax, long_name = {}, None
        data = _read_member(source, size)
        padding = -size % _BLOCK
        if len(data) < size or len(_read_exact(source, padding)) < padding:
            raise TarFormatError(f"member {name} cut short", truncated=True, member=name)
        if kind in _REGULAR:
            yield name, data


def iter_tar_samples(
    url: str, counter: SkipCounter, read_timeout_s: float = 0.0
) -> Iterator[RawSample]:
    """Yield the raw samples of one shard; problems are counted, never raised.

    Args:
        url: Shard URL (anything :func:`ldm.data.shards.open_url` opens).
        counter: Where ``open_error``, ``bad_tar`` and ``truncated_tar`` are counted. A
            duplicated member marks the sample ``"__bad__"`` so the decoder counts it once.
        read_timeout_s: A subprocess reader (``pipe:``...) that gives no bytes for this long is
            killed (0: wait forever).

    Yields:
        Raw samples in tar order.

    Raises:
        ldm.data.pipe.ShardReadTimeout: The reader stalled (a misconfiguration or a dead source).
    """
    try:
        stream = open_url(url, read_timeout_s)
    except Exception as exc:  # any opener failure is a skipped shard
        counter.skip("open_error", url=url, detail=repr(exc))
        return
    current: RawSample | None = None
    try:
        for name, data in iter_tar_members(stream):
            if _META.search(name):
                continue
            prefix, ext = base_plus_ext(name)
            if prefix is None:
                continue
            if current is None or current["__key__"] != prefix:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            ext = ext.lower()
            if ext in current:
                current["__bad__"] = ("duplicate_member", f"{name} appears twice")
            current[ext] = data
    except TarFormatError as exc:
        if exc.member is not None and current is not None:
            if base_plus_ext(exc.member)[0] == current["__key__"]:
                current = None  # this sample was cut in half: it goes with the tar error
        reason = "truncated_tar" if exc.truncated else "bad_tar"
        counter.skip(reason, url=url, key=current["__key__"] if current else "", detail=str(exc))
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        reason = "truncated_tar" if isinstance(exc, EOFError) else "bad_tar"
        counter.skip(reason, url=url, detail=repr(exc))
    finally:
        try:
            stream.close()
        except Exception as exc:  # e.g. a pipe: command exiting non-zero
            counter.skip("open_error", url=url, detail=f"on close: {exc!r}")
    if current is not None:
        yield current
