"""Chunk frames: a fixed header, then the chunk raw or lz4-framed, whichever is smaller.

Header (24 bytes, little-endian)::

    magic "GF" | version u8 | flags u8 | stored_len u32 | raw_len u32 | offset u64 | crc32 u32

``flags`` bit 0 says the payload is an lz4 frame (``lz4.frame``); ``stored_len`` is the
payload's length on the wire, ``raw_len`` the chunk's length, ``offset`` its place in the
blob and ``crc32`` the checksum of the raw chunk (so a corrupt payload is caught whether it
breaks the decompressor or not). The whole blob is verified against its sha256 id by the
receiver (:mod:`ganglion.transport.service`).

Hostile input is rejected before memory is committed to it: lengths are checked against
:class:`Limits` from the header alone, and lz4 output is capped at the declared raw length (a
payload that would decompress to more is a :class:`CorruptFrameError`, not a bomb).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import lz4.frame

from ganglion.transport.errors import CorruptFrameError, FrameTooLargeError, TruncatedFrameError

MAGIC = b"GF"
VERSION = 1
FLAG_LZ4 = 0x01
_KNOWN_FLAGS = FLAG_LZ4
HEADER = struct.Struct("<2sBBIIQI")
HEADER_BYTES = HEADER.size

KIB = 1 << 10
MIB = 1 << 20
DEFAULT_CHUNK_BYTES = 1 * MIB
MIN_CHUNK_BYTES = 4 * KIB
MAX_CHUNK_BYTES = 16 * MIB


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts."""

    max_chunk_bytes: int = MAX_CHUNK_BYTES
    """Largest raw (and stored) chunk; a header claiming more is rejected unread."""


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TransportSettings:
    """How a sender cuts and encodes a blob (chosen by ``TuneTransport``)."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Raw bytes per chunk."""
    compress: bool = True
    """Try lz4 on each chunk; False sends every chunk raw."""
    lz4_level: int = 0
    """lz4.frame compression level: 0 fast (default), 3..16 high compression (slower)."""
    min_saving: float = 0.10
    """A chunk goes lz4 only if that saves at least this fraction of its raw size."""
    probe_every: int = 8
    """After a chunk that did not compress well, try lz4 again only every this many chunks
    (random data then costs one compression attempt in eight, not one per chunk)."""

    def __post_init__(self) -> None:
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], "
                f"got {self.chunk_bytes}"
            )
        if not 0 <= self.min_saving < 1:
            raise ValueError(f"min_saving must be in [0, 1), got {self.min_saving}")
        if not 0 <= self.lz4_level <= 16:
            raise ValueError(f"lz4_level must be in [0, 16], got {self.lz4_level}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")


@dataclass(frozen=True)
class FrameHeader:
    """A parsed, validated header."""

    compressed: bool
    """Payload is an lz4 frame."""
    stored_len: int
    """Payload bytes that follow the header."""
    raw_len: int
    """Chunk bytes after decoding."""
    offset: int
    """Position of the chunk in the blob."""
    crc32: int
    """zlib.crc32 of the raw chunk."""


@dataclass(frozen=True)
class Frame:
    """A decoded, verified chunk."""

    offset: int
    """Position in the blob."""
    data: bytes
    """The raw chunk."""
    stored_len: int
    """Payload bytes it took on the wire (header not counted)."""
    compressed: bool
    """Whether it travelled lz4-framed."""


def encode_frame(data: bytes, offset: int, payload: bytes | None = None) -> bytes:
    """A frame for ``data``; ``payload`` is its lz4 frame, or None to send it raw."""
    flags, body = (0, data) if payload is None else (FLAG_LZ4, payload)
    header = HEADER.pack(MAGIC, VERSION, flags, len(body), len(data), offset, zlib.crc32(data))
    return header + body


def parse_header(buf: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> FrameHeader:
    """Validate the first :data:`HEADER_BYTES` of ``buf``; nothing else is read."""
    if len(buf) < HEADER_BYTES:
        raise TruncatedFrameError(f"frame header needs {HEADER_BYTES} bytes, got {len(buf)}")
    magic, version, flags, stored, raw, offset, crc = HEADER.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise CorruptFrameError(f"not a v{VERSION} frame (magic {magic!r}, version {version})")
    if flags & ~_KNOWN_FLAGS:
        raise CorruptFrameError(f"unknown frame flags {flags:#x}")
    if raw > limits.max_chunk_bytes or stored > limits.max_chunk_bytes:
        raise FrameTooLargeError(
            f"frame claims {max(raw, stored)} bytes, more than the limit {limits.max_chunk_bytes}"
        )
    compressed = bool(flags & FLAG_LZ4)
    if not compressed and stored != raw:
        raise CorruptFrameError(f"raw frame with stored length {stored} != raw length {raw}")
    if compressed and stored >= raw:
        raise CorruptFrameError(f"lz4 frame not smaller than its chunk ({stored} >= {raw})")
    return FrameHeader(compressed, stored, raw, offset, crc)


def _decode_payload(header: FrameHeader, payload: bytes | memoryview) -> bytes:
    if not header.compressed:
        data = bytes(payload)
    else:
        d = lz4.frame.LZ4FrameDecompressor()
        try:
            data = d.decompress(payload, max_length=header.raw_len)
        except RuntimeError as exc:  # python-lz4 raises RuntimeError on malformed input
            raise CorruptFrameError(f"lz4 payload does not decode: {exc}") from exc
        if len(data) != header.raw_len or not d.eof or d.unused_data:
            raise CorruptFrameError(
                f"lz4 payload decodes to other than its declared {header.raw_len} bytes"
            )
    if zlib.crc32(data) != header.crc32:
        raise CorruptFrameError(f"chunk at offset {header.offset}: checksum mismatch")
    return data


def decode_frame(buf: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Parse, bound-check, decode and verify one frame that arrived whole (a gRPC message)."""
    header = parse_header(buf, limits)
    have = len(buf) - HEADER_BYTES
    if have < header.stored_len:
        raise TruncatedFrameError(f"frame payload has {have} of {header.stored_len} bytes")
    if have > header.stored_len:
        raise CorruptFrameError(f"{have - header.stored_len} bytes after the frame payload")
    data = _decode_payload(header, memoryview(buf)[HEADER_BYTES:])
    return Frame(header.offset, data, header.stored_len, header.compressed)


def read_frame(read: Callable[[int], bytes], limits: Limits = DEFAULT_LIMITS) -> Frame | None:
    """The next frame from a byte stream (``read(n)`` returns up to n bytes, b"" at EOF).

    None at a clean end of stream. The header is validated before the payload is read, so a
    header claiming gigabytes costs nothing but its 24 bytes.
    """
    head = _read_exactly(read, HEADER_BYTES, allow_eof=True)
    if head is None:
        return None
    header = parse_header(head, limits)
    payload = _read_exactly(read, header.stored_len, allow_eof=False)
    assert payload is not None
    return Frame(
        header.offset, _decode_payload(header, payload), header.stored_len, header.compressed
    )


def _read_exactly(read: Callable[[int], bytes], n: int, allow_eof: bool) -> bytes | None:
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = read(n - got)
        if not part:
            if got == 0 and allow_eof:
                return None
            raise TruncatedFrameError(f"stream ended after {got} of {n} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class ChunkEncoder:
    """Encodes successive chunks of one stream, adapting to how well they compress."""

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings
        self._skip = 0
        self.raw_bytes = 0
        """Raw bytes encoded so far."""
        self.stored_bytes = 0
        """Payload bytes produced so far."""
        self.lz4_chunks = 0
        """Chunks sent lz4-framed."""
        self.raw_chunks = 0
        """Chunks sent raw."""
        self.attempts = 0
        """Chunks lz4 was tried on."""

    def encode(self, data: bytes, offset: int) -> bytes:
        s = self.settings
        payload: bytes | None = None
        if s.compress and data:
            if self._skip > 0:
                self._skip -= 1
            else:
                self.attempts += 1
                c = lz4.frame.compress(data, compression_level=s.lz4_level, content_checksum=False)
                if len(c) <= len(data) * (1.0 - s.min_saving):
                    payload = c
                else:
                    self._skip = s.probe_every - 1
        self.raw_bytes += len(data)
        if payload is None:
            self.raw_chunks += 1
            self.stored_bytes += len(data)
        else:
            self.lz4_chunks += 1
            self.stored_bytes += len(payload)
        return encode_frame(data, offset, payload)

    @property
    def ratio(self) -> float:
        """Stored / raw bytes so far (1.0 before anything was encoded)."""
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0
