"""The client side of an MTProto proxy handshake, enough for tests to be
recognised by a replica as a real client of a given secret.

A client opens with 64 bytes (obfuscated2): random, except the protocol tag
at 56..60 and the data-centre index at 60..62; bytes 8..40 (key prefix) and
40..56 (IV) with the secret derive an AES-256-CTR key, and bytes 56..64 are
sent encrypted. The proxy decrypts them and checks the tag, so only a client
that knows the secret passes. Sending the same 64 bytes twice is a replay,
which mtprotoproxy logs with the client's address.

:class:`Session` is a whole client session over asyncio streams: the
handshake, then padded-intermediate packets both ways, optionally wrapped in
the fake-TLS (``ee``) records mtprotoproxy expects (Telethon has no such
transport): a 517-byte ClientHello whose random field is
HMAC-SHA256(secret, hello) XOR the Unix time, answered by a ServerHello,
ChangeCipherSpec and one application-data record, whose digest the client
checks; after that every byte travels in TLS application-data records."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import struct
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECURE_TAG = b"\xdd\xdd\xdd\xdd"  # padded intermediate: the `dd` secret form
# First bytes a client must avoid: they would read as another protocol.
RESERVED_STARTS = (b"HEAD", b"POST", b"GET ", b"OPTI", b"\xee\xee\xee\xee", SECURE_TAG, b"\x16\x03\x01\x02")


def _client_init(secret_hex: str, tag: bytes, dc: int):
    """A client's first 64 bytes and the ciphers that continue both directions."""
    while True:
        raw = bytearray(os.urandom(64))
        if raw[0] != 0xEF and bytes(raw[:4]) not in RESERVED_STARTS and raw[4:8] != b"\0\0\0\0":
            break
    raw[56:60] = tag
    raw[60:62] = dc.to_bytes(2, "little", signed=True)
    secret = bytes.fromhex(secret_hex)
    key = hashlib.sha256(bytes(raw[8:40]) + secret).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(raw[40:56]))).encryptor()
    encrypted = encryptor.update(bytes(raw))
    reverse = bytes(raw[8:56])[::-1]
    decryptor = Cipher(algorithms.AES(hashlib.sha256(reverse[:32] + secret).digest()), modes.CTR(reverse[32:48]))
    return bytes(raw[:56]) + encrypted[56:64], encryptor, decryptor.decryptor()


def handshake(secret_hex: str, tag: bytes = SECURE_TAG, dc: int = 2) -> bytes:
    """A client's first 64 bytes for ``secret_hex`` (32 hex characters)."""
    return _client_init(secret_hex, tag, dc)[0]


TLS_RECORD = struct.Struct(">BHH")  # type, version, length
TLS_APPLICATION_DATA, TLS_CHANGE_CIPHER, TLS_HANDSHAKE = 0x17, 0x14, 0x16
CHANGE_CIPHER_SPEC = b"\x14\x03\x03\x00\x01\x01"
HELLO_LEN = 517  # mtprotoproxy's TLS_HANDSHAKE_LEN
DIGEST_POS, DIGEST_LEN = 11, 32


def fake_tls_hello(secret_hex: str, domain: str, now: float | None = None) -> bytes:
    """A TLS 1.3-looking ClientHello for ``domain`` carrying the fake-TLS digest."""
    name = domain.encode()
    server_name = struct.pack(">HBH", len(name) + 3, 0, len(name)) + name
    extensions = struct.pack(">HH", 0x0000, len(server_name)) + server_name  # server_name
    extensions += bytes.fromhex("000a00040002001d")  # supported_groups: x25519
    extensions += bytes.fromhex("002b0003020304")  # supported_versions: TLS 1.3
    extensions += bytes.fromhex("000d000400020804")  # signature_algorithms
    extensions += b"\x00\x33\x00\x26\x00\x24\x00\x1d\x00\x20" + os.urandom(32)  # key_share
    body = b"\x03\x03" + bytes(DIGEST_LEN) + b"\x20" + os.urandom(32)
    body += bytes.fromhex("0006130113021303") + b"\x01\x00"  # cipher suites, no compression
    # A padding extension fills the record to mtprotoproxy's fixed length.
    fill = HELLO_LEN - 5 - 4 - len(body) - 2 - len(extensions) - 4
    extensions += struct.pack(">HH", 0x0015, fill) + bytes(fill)
    body += struct.pack(">H", len(extensions)) + extensions
    hello = TLS_RECORD.pack(TLS_HANDSHAKE, 0x0301, len(body) + 4) + b"\x01" + len(body).to_bytes(3, "big") + body
    assert len(hello) == HELLO_LEN, len(hello)
    digest = hmac.new(bytes.fromhex(secret_hex), hello, hashlib.sha256).digest()
    stamp = bytes(28) + int(time.time() if now is None else now).to_bytes(4, "little")
    digest = bytes(a ^ b for a, b in zip(digest, stamp, strict=True))
    return hello[:DIGEST_POS] + digest + hello[DIGEST_POS + DIGEST_LEN :]


class Session:
    """One client session: :meth:`open` does the handshake (fake-TLS first with
    ``tls_domain``), then :meth:`send` / :meth:`recv` move padded-intermediate
    packets (payloads in multiples of 4 bytes)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool) -> None:
        self.reader, self.writer, self.tls = reader, writer, tls
        self.encryptor = self.decryptor = None
        self.pending = b""

    @classmethod
    async def open(
        cls, host: str, port: int, secret_hex: str, tls_domain: str = "", dc: int = 2, timeout: float = 10
    ) -> Session:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        session = cls(reader, writer, bool(tls_domain))
        if tls_domain:
            await asyncio.wait_for(session._tls_handshake(secret_hex, tls_domain), timeout)
        init, session.encryptor, session.decryptor = _client_init(secret_hex, SECURE_TAG, dc)
        session._write(init)
        return session

    async def _tls_handshake(self, secret_hex: str, domain: str) -> None:
        hello = fake_tls_hello(secret_hex, domain)
        self.writer.write(hello)
        answer = b""
        for expected in (TLS_HANDSHAKE, TLS_CHANGE_CIPHER, TLS_APPLICATION_DATA):
            header = await self.reader.readexactly(TLS_RECORD.size)
            kind, _, length = TLS_RECORD.unpack(header)
            if kind != expected:
                raise ConnectionError(f"fake-TLS: record type {kind:#x} where {expected:#x} was expected")
            answer += header + await self.reader.readexactly(length)
        digest = answer[DIGEST_POS : DIGEST_POS + DIGEST_LEN]
        blank = answer[:DIGEST_POS] + bytes(DIGEST_LEN) + answer[DIGEST_POS + DIGEST_LEN :]
        expected_digest = hmac.new(
            bytes.fromhex(secret_hex), hello[DIGEST_POS : DIGEST_POS + DIGEST_LEN] + blank, hashlib.sha256
        ).digest()
        if not hmac.compare_digest(digest, expected_digest):
            raise ConnectionError("fake-TLS: the server hello is not signed with our secret")
        self.writer.write(CHANGE_CIPHER_SPEC)

    def _write(self, data: bytes) -> None:
        if self.tls:
            data = TLS_RECORD.pack(TLS_APPLICATION_DATA, 0x0303, len(data)) + data
        self.writer.write(data)

    async def _read(self, count: int) -> bytes:
        if not self.tls:
            return await self.reader.readexactly(count)
        while len(self.pending) < count:
            kind, _, length = TLS_RECORD.unpack(await self.reader.readexactly(TLS_RECORD.size))
            record = await self.reader.readexactly(length)
            if kind == TLS_APPLICATION_DATA:
                self.pending += record
        data, self.pending = self.pending[:count], self.pending[count:]
        return data

    async def send(self, payload: bytes) -> None:
        """One packet, with 0-3 random padding bytes as the `dd` transport adds."""
        padded = payload + os.urandom(os.urandom(1)[0] % 4)
        self._write(self.encryptor.update(struct.pack("<I", len(padded)) + padded))
        await self.writer.drain()

    async def recv(self) -> bytes:
        (length,) = struct.unpack("<I", self.decryptor.update(await self._read(4)))
        packet = self.decryptor.update(await self._read(length))
        return packet[: len(packet) - len(packet) % 4]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
