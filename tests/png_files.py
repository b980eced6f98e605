"""PNG files built byte by byte for the serving limits' tests: a header alone (nothing to decode),
and a black image of any size whose file stays small (a decompression bomb)."""
from __future__ import annotations

import struct
import zlib


def png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG of width x height 8-bit RGB whose IDAT is ``idat`` (none: only the header is valid)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"IDAT", idat) if idat else b"")
            + chunk(b"IEND", b""))


def zero_png(width: int, height: int) -> bytes:
    """A black width x height RGB PNG (13000 x 13000 is a 0.5 MB file). Built fast: a block of rows
    compressed once and ended by a full flush (no reference back into it) is repeated, then the
    closing block and the checksum of all the rows."""
    rows = next(k for k in range(min(height, 100), 0, -1) if height % k == 0)
    raw = b"\0" * ((1 + 3 * width) * rows)  # each row: filter byte 0, then the pixels
    comp = zlib.compressobj(9)
    block = comp.compress(raw) + comp.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows):
        adler = zlib.adler32(raw, adler)
    stream = block[:2] + block[2:] * (height // rows) + b"\x03\x00" + adler.to_bytes(4, "big")
    return png_header(width, height, stream)
