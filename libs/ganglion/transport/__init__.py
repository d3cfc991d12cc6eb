"""Blob transport: lz4-or-raw chunk frames with checksums, the TransferService server and
client (resumable Fetch/Push), backends (disk cache with read-through, memory) and a
bandwidth-capped loopback proxy for benchmarks."""

from ganglion.transport.errors import (
    CorruptFrameError,
    FrameError,
    FrameTooLargeError,
    TransferError,
    TransportError,
    TruncatedFrameError,
)
from ganglion.transport.frames import (
    DEFAULT_CHUNK_BYTES,
    HEADER_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    ChunkEncoder,
    Frame,
    FrameHeader,
    Limits,
    TransportSettings,
    decode_frame,
    encode_frame,
    parse_header,
    read_frame,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "HEADER_BYTES",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "ChunkEncoder",
    "CorruptFrameError",
    "Frame",
    "FrameError",
    "FrameHeader",
    "FrameTooLargeError",
    "Limits",
    "TransferError",
    "TransportError",
    "TransportSettings",
    "TruncatedFrameError",
    "decode_frame",
    "encode_frame",
    "parse_header",
    "read_frame",
]
