"""Real MTProto client sessions, run in the client namespace by the tests.

Each session connects to an MTProxy (the cell's frontend), completes the
client handshake and sends packets one at a time; the stand-in data centre
behind the replica echoes them, so each must come back byte-identical. The
transports: Telethon's MTProxy connections (a third-party client, pinned in
requirements.txt) for ``abridged`` and ``intermediate`` (classic secrets)
and ``secure`` (``dd``, randomized intermediate); our own
:class:`mtproto.Session` for ``tls`` (``ee``, which Telethon lacks).

All sessions run concurrently in this one process. Once every session has
completed its handshake, a line ``{"ready": [local ports]}`` goes to stderr
(a test can then find each session's replica); with ``--stdin``, the
sessions then wait for a line on stdin before sending and, with
``--packets 0``, send until stdin is closed. The report, one JSON object,
goes to stdout at the end::

    python3 test/traffic.py 198.18.1.1 8443 SECRET --transport secure --sessions 20 --packets 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtproto import Session

TRANSPORTS = ("abridged", "intermediate", "secure", "tls")


class _Loggers(dict):
    """What Telethon's connections take as ``loggers``: a logger per module name."""

    def __missing__(self, key: str) -> logging.Logger:
        return logging.getLogger(key)


class TelethonSession:
    """A Telethon MTProxy connection with the :class:`mtproto.Session` methods."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.writer = connection._writer

    @classmethod
    async def open(cls, host: str, port: int, secret_hex: str, transport: str, timeout: float = 10):
        from telethon.network.connection import (
            ConnectionTcpMTProxyAbridged,
            ConnectionTcpMTProxyIntermediate,
            ConnectionTcpMTProxyRandomizedIntermediate,
        )

        kind, secret = {
            "abridged": (ConnectionTcpMTProxyAbridged, secret_hex),
            "intermediate": (ConnectionTcpMTProxyIntermediate, secret_hex),
            "secure": (ConnectionTcpMTProxyRandomizedIntermediate, "dd" + secret_hex),
        }[transport]
        connection = kind(host, port, 2, loggers=_Loggers(), proxy=(host, port, secret))
        await connection.connect(timeout=timeout)
        return cls(connection)

    async def send(self, payload: bytes) -> None:
        await self.connection.send(payload)

    async def recv(self) -> bytes:
        return await self.connection.recv()

    async def close(self) -> None:
        await self.connection.disconnect()


async def open_session(args: argparse.Namespace):
    if args.transport == "tls":
        return await Session.open(args.host, args.port, args.secret, tls_domain=args.tls_domain)
    return await TelethonSession.open(args.host, args.port, args.secret, args.transport)


def payload() -> bytes:
    # Multiples of 4: the abridged and padded transports carry whole words.
    return os.urandom(4 * (4 + os.urandom(2)[0] % 253))


async def round_trip(session, report: dict, timeout: float) -> None:
    sent = payload()
    await session.send(sent)
    got = await asyncio.wait_for(session.recv(), timeout)
    report["packets"] += 1
    report["bytes"] += len(sent)
    if got != sent:
        report["mismatches"] += 1


async def run_session(args: argparse.Namespace, ready: asyncio.Event, stop: asyncio.Event, opened: list) -> dict:
    report: dict = {"packets": 0, "bytes": 0, "mismatches": 0, "error": None, "reconnect": None, "port": None}
    try:
        session = await open_session(args)
    except Exception as exc:  # reported, not raised: the other sessions go on
        report["error"] = f"connect: {type(exc).__name__}: {exc}"
        opened.append(None)
        return report
    report["port"] = session.writer.get_extra_info("sockname")[1]
    opened.append(report["port"])
    try:
        await ready.wait()
        while not stop.is_set() and (not args.packets or report["packets"] < args.packets):
            await round_trip(session, report, args.timeout)
            if args.interval:
                await asyncio.sleep(args.interval)
    except Exception as exc:
        report["error"] = f"after {report['packets']} packets: {type(exc).__name__}: {exc}"
    finally:
        await session.close()
    if report["error"] and args.reconnect:
        # What a real client does next: connect again, through the frontend.
        started = time.monotonic()
        again = {"packets": 0, "bytes": 0, "mismatches": 0}
        try:
            session = await open_session(args)
            try:
                for _ in range(3):
                    await round_trip(session, again, args.timeout)
            finally:
                await session.close()
            report["reconnect"] = {**again, "ok": again["mismatches"] == 0, "seconds": time.monotonic() - started}
        except Exception as exc:
            report["reconnect"] = {**again, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return report


async def main_async(args: argparse.Namespace) -> dict:
    ready, stop = asyncio.Event(), asyncio.Event()
    opened: list = []
    started = time.monotonic()
    tasks = [asyncio.ensure_future(run_session(args, ready, stop, opened)) for _ in range(args.sessions)]
    while len(opened) < args.sessions:
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": opened}), file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    if args.stdin:
        await loop.run_in_executor(None, sys.stdin.readline)
    ready.set()
    if args.stdin and not args.packets:
        stdin_closed = loop.run_in_executor(None, sys.stdin.read)
        stdin_closed.add_done_callback(lambda _: stop.set())
    sessions = await asyncio.gather(*tasks)
    return {
        "transport": args.transport,
        "sessions": len(sessions),
        "connected": sum(1 for s in sessions if s["port"]),
        "failed": sum(1 for s in sessions if s["error"]),
        "packets": sum(s["packets"] for s in sessions),
        "bytes": sum(s["bytes"] for s in sessions),
        "mismatches": sum(s["mismatches"] for s in sessions),
        "seconds": round(time.monotonic() - started, 2),
        "each": sessions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("secret", help="32 hex characters (no dd/ee prefix)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="secure")
    parser.add_argument("--tls-domain", default="", help="for --transport tls")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--packets", type=int, default=50, help="round trips per session (0: until stdin closes)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between a session's round trips")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each echo")
    parser.add_argument("--stdin", action="store_true", help="start on a line from stdin, stop when it closes")
    parser.add_argument("--reconnect", action="store_true", help="a failed session connects again once")
    args = parser.parse_args(argv)
    if args.transport == "tls" and not args.tls_domain:
        parser.error("--transport tls needs --tls-domain")
    if not args.packets and not args.stdin:
        parser.error("--packets 0 needs --stdin")
    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(asyncio.run(main_async(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
