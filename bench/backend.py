"""Bench backend: stands in for mtprotoproxy in the data-path benchmark.

Runs inside a replica container (image made by bench/run.py from the
mtprotoproxy image: Python 3.9) with the replica's own config file as its
argument, so it listens where the replica would (``LISTEN_ADDR_IPV4:PORT``,
behind the cell's HAProxy and return path), and also on ``PORT + 1000``, a
port outside the return-path rules that a client can reach directly (the
baseline).

Each connection gets one greeting byte at once. A request line ``bulk N``
is answered with N zero bytes by sendfile() (little CPU here, so the relay is
what is measured), then the connection is closed; otherwise it is closed when
the client closes.
"""

import asyncio
import os
import runpy
import sys

GREETING = b"H"
DIRECT_OFFSET = 1000
CHUNK = 64 << 20


def main() -> None:
    config = runpy.run_path(sys.argv[1]) if len(sys.argv) > 1 else {}
    port = int(config.get("PORT", 4431))
    address = config.get("LISTEN_ADDR_IPV4") or "0.0.0.0"
    fd = os.memfd_create("bench-zeros")
    os.ftruncate(fd, CHUNK)
    zeros = os.fdopen(fd, "rb")

    async def handle(reader, writer):
        try:
            writer.write(GREETING)
            line = await reader.readline()
            if line.startswith(b"bulk "):
                remaining = int(line.split()[1])
                loop = asyncio.get_running_loop()
                while remaining > 0:
                    sent = await loop.sendfile(writer.transport, zeros, 0, min(remaining, CHUNK))
                    remaining -= sent
                await writer.drain()
        except (OSError, ValueError):
            pass
        finally:
            writer.close()

    async def serve():
        servers = [
            await asyncio.start_server(handle, address, p, backlog=4096, reuse_address=True)
            for p in (port, port + DIRECT_OFFSET)
        ]
        print(f"bench backend on {address}:{port} and :{port + DIRECT_OFFSET}", flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(serve())


if __name__ == "__main__":
    main()
