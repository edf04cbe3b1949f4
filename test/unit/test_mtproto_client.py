"""The real-traffic test tools on loopback, without a replica: the stand-in
data centre speaks the data centre's side of obfuscated2 as mtprotoproxy's
direct connection expects it, and our fake-TLS ClientHello passes the check
mtprotoproxy 1.0.6 makes (handle_fake_tls_handshake, restated here)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from mtproto import DIGEST_LEN, DIGEST_POS, HELLO_LEN, SECURE_TAG, fake_tls_hello
from standin_dc import Counters, start

SECRET = "3f9a0c5e7b21d48e96a1c0f2b7d35e84"
TLS_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def _ctr(key: bytes, iv: bytes):
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


async def _replica_side(port: int, packets: list[bytes]) -> list[bytes]:
    """What mtprotoproxy's do_direct_handshake does towards a data centre, then echo reads."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    init = bytearray(os.urandom(64))
    init[0] = 0x01  # not 0xef, not a reserved start
    init[56:60] = SECURE_TAG
    encryptor = _ctr(bytes(init[8:40]), bytes(init[40:56]))
    reverse = bytes(init[8:56])[::-1]
    decryptor = _ctr(reverse[:32], reverse[32:48])
    writer.write(bytes(init[:56]) + encryptor.update(bytes(init))[56:])
    echoed = []
    for packet in packets:
        writer.write(encryptor.update(packet))
        await writer.drain()
        echoed.append(decryptor.update(await reader.readexactly(len(packet))))
    writer.close()
    return echoed


def test_the_stand_in_echoes_what_it_decrypts_and_counts_it(tmp_path):
    packets = [struct.pack("<I", n) + os.urandom(n) for n in (16, 1000, 4)]

    async def scenario():
        counters = Counters(tmp_path / "status.json")
        server = await start("127.0.0.1:0", counters)
        async with server:
            echoed = await _replica_side(server.sockets[0].getsockname()[1], packets)
            for _ in range(50):
                if not counters.data["active"]:
                    break
                await asyncio.sleep(0.02)
        return echoed, counters

    echoed, counters = asyncio.run(scenario())
    assert echoed == packets
    total = sum(map(len, packets))
    assert counters.data["sessions"] == counters.data["closed"] == 1
    assert counters.data["tags"] == {"secure": 1}
    assert counters.data["bytes_in"] == counters.data["bytes_out"] == total
    counters.write()
    assert (tmp_path / "status.json").read_text().count('"sessions": 1') == 1


def _mtprotoproxy_accepts(hello: bytes, secret_hex: str) -> bool:
    """handle_fake_tls_handshake's test of a ClientHello, for one secret."""
    digest = hello[DIGEST_POS : DIGEST_POS + DIGEST_LEN]
    blank = hello[:DIGEST_POS] + bytes(DIGEST_LEN) + hello[DIGEST_POS + DIGEST_LEN :]
    computed = hmac.new(bytes.fromhex(secret_hex), blank, hashlib.sha256).digest()
    xored = bytes(a ^ b for a, b in zip(digest, computed, strict=True))
    stamp = int.from_bytes(xored[-4:], "little")
    return xored.startswith(bytes(DIGEST_LEN - 4)) and -20 * 60 < time.time() - stamp < 10 * 60


def test_the_fake_tls_hello_passes_mtprotoproxys_check_for_its_secret_only():
    hello = fake_tls_hello(SECRET, "tls.example.test")
    assert len(hello) == HELLO_LEN and hello.startswith(TLS_START)
    assert b"tls.example.test" in hello
    assert _mtprotoproxy_accepts(hello, SECRET)
    assert not _mtprotoproxy_accepts(hello, "00" * 16)
    assert not _mtprotoproxy_accepts(fake_tls_hello(SECRET, "tls.example.test", now=time.time() - 3600), SECRET)
