"""A stand-in Telegram data centre for test hosts, and the test-only replica
image that talks to it.

Telegram is unreachable from a test host (it has no route out), so a replica
that completed a client's handshake has nowhere to relay to. The stand-in
listens on the test host's own address, port 443, where the derived image
(:func:`derive_image`) sends mtprotoproxy's data-centre connections. It
speaks the data centre's side of obfuscated2: the replica opens with 64 bytes,
AES-256-CTR with key ``init[8:40]`` and IV ``init[40:56]`` decrypts them (the
protocol tag is at ``[56:60]``) and everything after; replies are encrypted
with the reversed ``init[8:56]``. It decrypts every byte and echoes it back
re-encrypted, so whatever framing the client chose comes back byte for byte.

It counts sessions and bytes in a JSON status file. Started by PID inside the
test host and stopped by PID (:class:`StandIn`), or from the shell::

    python3 test/standin_dc.py --listen 198.18.1.1:443 --status /tmp/dc.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from testhost import stop_process

if TYPE_CHECKING:
    from testhost import TestHost

# mtprotoproxy's TG_DATACENTER_PORT.
DC_PORT = 443
INIT_LEN = 64
TAGS = {b"\xef\xef\xef\xef": "abridged", b"\xee\xee\xee\xee": "intermediate", b"\xdd\xdd\xdd\xdd": "secure"}
# The test-only replica image: never a formula default.
TEST_IMAGE = "mtproxy-formula/mtprotoproxy:test-standin"
BASE_IMAGE_MANIFEST = Path(__file__).resolve().parent.parent / "build" / "images" / "mtprotoproxy.json"


def _ctr(key: bytes, iv: bytes):
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


class Counters:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {
            "pid": os.getpid(),
            "sessions": 0,
            "active": 0,
            "closed": 0,
            "bad_init": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "tags": {},
        }
        self.dirty = True

    def add(self, **counts: int) -> None:
        for key, value in counts.items():
            self.data[key] += value
        self.dirty = True

    def write(self) -> None:
        if self.dirty:
            self.dirty = False
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)


async def serve_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters: Counters) -> None:
    try:
        init = await reader.readexactly(INIT_LEN)
    except (asyncio.IncompleteReadError, OSError):
        counters.add(bad_init=1)
        writer.close()
        return
    decryptor = _ctr(init[8:40], init[40:56])
    tag = decryptor.update(init)[56:60]
    reverse = init[8:56][::-1]
    encryptor = _ctr(reverse[:32], reverse[32:48])
    name = TAGS.get(tag, "unknown")
    counters.data["tags"][name] = counters.data["tags"].get(name, 0) + 1
    counters.add(sessions=1, active=1)
    try:
        while data := await reader.read(65536):
            counters.add(bytes_in=len(data))
            writer.write(encryptor.update(decryptor.update(data)))
            await writer.drain()
            counters.add(bytes_out=len(data))
    except OSError:
        pass
    finally:
        counters.add(active=-1, closed=1)
        writer.close()


async def start(listen: str, counters: Counters) -> asyncio.Server:
    """The stand-in's server on ``ADDRESS:PORT`` (port 0: any free one)."""
    address, port = listen.rsplit(":", 1)
    return await asyncio.start_server(
        lambda r, w: serve_session(r, w, counters), address, int(port), reuse_address=True, backlog=1024
    )


async def main_async(listen: str, status: Path) -> None:
    counters = Counters(status)
    server = await start(listen, counters)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counters.write()
    async with server:
        while not stop.is_set():
            counters.write()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
    counters.write()


class StandIn:
    """The stand-in inside ``host``'s namespace, on its address port 443."""

    def __init__(self, host: TestHost) -> None:
        self.host = host
        self.status_path = host.workdir / "standin-dc.json"
        self.status_path.unlink(missing_ok=True)
        self.log = open(host.workdir / "standin-dc.log", "ab")  # noqa: SIM115 (the process keeps it)
        cmd = [sys.executable, __file__, "--listen", f"{host.address}:{DC_PORT}", "--status", str(self.status_path)]
        # nsenter execs the interpreter: the PID is the stand-in's own. Its own
        # session: a terminal's Ctrl-C or hangup does not end it (the demo's outlives
        # `make demo`); it is stopped by PID.
        self.proc = subprocess.Popen(
            host.nsenter() + cmd, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 15
        while not self.status_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (host.workdir / "standin-dc.log").read_text()[-2000:]
                raise RuntimeError(f"stand-in data centre did not start: {log}")
            time.sleep(0.05)

    def status(self) -> dict:
        return json.loads(self.status_path.read_text())

    def wait_idle(self, timeout: float = 10) -> dict:
        """The status once no session is open (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while (status := self.status())["active"] and time.monotonic() < deadline:
            time.sleep(0.1)
        return status

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


# The entry point /usr/local/bin/mtprotoproxy is a copy of mtprotoproxy.py: both are rewritten.
REWRITE = r"""
import pathlib, re, shutil, sys
listed = "TG_DATACENTERS_V4 = [%s]" % ", ".join([repr(sys.argv[1])] * 5)
for path in (pathlib.Path("/usr/local/bin/mtprotoproxy"), pathlib.Path("/usr/local/bin/mtprotoproxy.py")):
    text, count = re.subn(r"TG_DATACENTERS_V4 = \[[^\]]*\]", listed, path.read_text())
    if count != 1:
        sys.exit("TG_DATACENTERS_V4 not found once in " + str(path))
    path.write_text(text)
    print(path, re.search(r"TG_DATACENTERS_V4 = .*", text).group(0))
shutil.rmtree("/usr/local/bin/__pycache__", ignore_errors=True)
"""


def derive_image(host: TestHost, image: str = TEST_IMAGE) -> str:
    """Derive the test-only replica image in ``host``'s dockerd from the locally
    built mtprotoproxy image: its five IPv4 data centres become the test host's
    own address (where :class:`StandIn` listens). Returns the image name."""
    manifest = json.loads(BASE_IMAGE_MANIFEST.read_text())
    container = "mtpf-derive-standin"
    host.docker("rm", "-f", container, check=False)
    out = host.docker(
        "run",
        "--name",
        container,
        "--network",
        "none",
        "--entrypoint",
        "python3",
        manifest["image"],
        "-c",
        REWRITE,
        host.address,
    ).stdout
    if out.count(host.address) != 10:
        raise RuntimeError(f"the data-centre list was not rewritten: {out}")
    changes = [*manifest["changes"], "LABEL mtproxy-formula.test-only=stand-in-dc"]
    host.docker("commit", *(arg for change in changes for arg in ("--change", change)), container, image)
    host.docker("rm", "-f", container)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT")
    parser.add_argument("--status", required=True, type=Path, help="JSON status file, rewritten as counts change")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.listen, args.status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
