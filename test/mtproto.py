"""The client side of an MTProto proxy handshake, enough for tests to be
recognised by a replica as a real client of a given secret.

A client opens with 64 bytes (obfuscated2): random, except the protocol tag
at 56..60 and the data-centre index at 60..62; bytes 8..40 (key prefix) and
40..56 (IV) with the secret derive an AES-256-CTR key, and bytes 56..64 are
sent encrypted. The proxy decrypts them and checks the tag, so only a client
that knows the secret passes. Sending the same 64 bytes twice is a replay,
which mtprotoproxy logs with the client's address."""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECURE_TAG = b"\xdd\xdd\xdd\xdd"  # padded intermediate: the `dd` secret form
# First bytes a client must avoid: they would read as another protocol.
RESERVED_STARTS = (b"HEAD", b"POST", b"GET ", b"OPTI", b"\xee\xee\xee\xee", SECURE_TAG, b"\x16\x03\x01\x02")


def handshake(secret_hex: str, tag: bytes = SECURE_TAG, dc: int = 2) -> bytes:
    """A client's first 64 bytes for ``secret_hex`` (32 hex characters)."""
    while True:
        raw = bytearray(os.urandom(64))
        if raw[0] != 0xEF and bytes(raw[:4]) not in RESERVED_STARTS and raw[4:8] != b"\0\0\0\0":
            break
    raw[56:60] = tag
    raw[60:62] = dc.to_bytes(2, "little", signed=True)
    key = hashlib.sha256(bytes(raw[8:40]) + bytes.fromhex(secret_hex)).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(raw[40:56]))).encryptor()
    encrypted = encryptor.update(bytes(raw)) + encryptor.finalize()
    return bytes(raw[:56]) + encrypted[56:64]
