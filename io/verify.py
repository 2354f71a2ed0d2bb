"""verify=crc32c|md5: every block a job writes carries a header with a checksum, and is checked
when it is read back (after a write job's writes, as fio's do_verify) or read by a later job.

The header is ours (fio need not read it), the first 48 bytes of every block, little-endian:

    offset  size  field
    0       8     magic b"HTIOVRFY"
    8       8     the block's offset in the file
    16      4     the block's length (the I/O's size)
    20      2     checksum kind: 1 crc32c, 2 md5
    22      2     header length (48)
    24      8     generation: a token of the run that wrote it (a read-back of a write job
                  also refuses a block left by an earlier run, i.e. a lost write)
    32      16    checksum of the whole block with this field zeroed (crc32c: 4 bytes, then zeros)

The rest of the block is the job's random buffer. A block that fails names the file, its
offset and length, and the expected and received checksums, as fio's message does.
"""

from __future__ import annotations

import hashlib
import struct

HEADER = struct.Struct("<8sQIHHQ16s")
MAGIC = b"HTIOVRFY"
KINDS = {"crc32c": 1, "md5": 2}
CHECKSUM_AT = 32


class VerifyUnavailable(OSError):
    """crc32c's C module could not be built here (md5 needs nothing)."""


def _crc32c():
    from .. import native

    module = native.load("hpc_train.io", "crc32c.c", "_crc32c")
    if module is None:
        raise VerifyUnavailable("verify=crc32c needs its C module, which could not be built here (see the warning "
                                "above); use verify=md5")
    return module.crc32c


def checksummer(kind: str):
    """The function bytes -> 16-byte checksum field of this kind."""
    if kind == "md5":
        return lambda block: hashlib.md5(block).digest()
    crc32c = _crc32c()
    return lambda block: struct.pack("<I", crc32c(block)) + bytes(12)


class Verifier:
    """Stamps blocks before they are written and checks blocks read back, for one job copy."""

    def __init__(self, kind: str, generation: int):
        self.kind, self.generation = kind, generation
        self.checksum = checksummer(kind)

    def stamp(self, block: memoryview, offset: int) -> None:
        """Write the header of the block at `offset` into it (the rest is already the job's data)."""
        header = HEADER.pack(MAGIC, offset, len(block), KINDS[self.kind], HEADER.size, self.generation, bytes(16))
        block[: HEADER.size] = header
        block[CHECKSUM_AT : HEADER.size] = self.checksum(block)

    def check(self, block: memoryview, offset: int, path, generation: int | None) -> str | None:
        """Why the block read at `offset` fails verification, or None; `generation` None accepts
        any run's blocks (a read job checking a file written before)."""
        magic, at, length, kind, size, made_by, stored = HEADER.unpack(bytes(block[: HEADER.size]))
        where = f"{path}: verify ({self.kind}) failed at offset {offset}, length {len(block)}"
        if magic != MAGIC or size != HEADER.size:
            return f"{where}: no verify header there (magic {magic!r}); was it written with verify={self.kind}?"
        if (at, length) != (offset, len(block)):
            return f"{where}: the block there says it belongs at offset {at}, length {length} (misplaced write)"
        if kind != KINDS[self.kind]:
            return f"{where}: the block was written with another checksum kind ({kind})"
        if generation is not None and made_by != generation:
            return f"{where}: the block was written by another run (a lost or stale write)"
        copy = bytearray(block)
        copy[CHECKSUM_AT : HEADER.size] = bytes(16)
        received = self.checksum(copy)
        if received != stored:
            width = 4 if self.kind == "crc32c" else 16
            return f"{where}: expected checksum {stored[:width].hex()}, received {received[:width].hex()}"
        return None
