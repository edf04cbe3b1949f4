"""The real-data-path benchmarks' client: MTProto sessions (test/mtproto.py's
raw :class:`Session`, padded intermediate, a ``dd`` client) to an MTProxy whose
replicas relay to the stand-in data centre (test/standin_dc.py), which echoes
every byte. Run in a test host's client namespace; prints one JSON report.

Modes (``mtload.py MODE HOST:PORT SECRET ...``):

- ``throughput``: ``--sessions`` sessions complete their handshake, then each
  sends ``--size``-byte packets for ``--duration`` s, reading the echoes as
  they come (at most ``--window`` bytes in flight per session); counts the
  bytes echoed back, byte-exact.
- ``sessions``: closed loop, ``--concurrency`` workers each open a session,
  round-trip one small packet (the handshake is then complete all the way to
  the data centre), close, again, for ``--duration`` s.
- ``open``: open loop, ``--rate`` new sessions per second for ``--duration``
  s, each timed from connect() to its first echoed packet (the client sends
  its handshake and packet at once, as real clients do).
- ``rtt``: one session, ``--count`` packets of ``--size`` bytes one at a
  time, each timed from send to echo.

Every report has a ``client`` block (:class:`loadgen.ClientUsage`, counted
from the start of the measured part): its CPU use of one core. A client near
100 % of a core measured itself, not the relay.

Telethon is not used: its loop adds tens of ms per round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadgen import ClientUsage, raise_nofile
from mtproto import Session

from bench.netload import Timed, paced, saturated
from bench.stats import summary


async def echo_once(host: str, port: int, secret: str, timeout: float, payload: bytes) -> float:
    """Seconds from connect() to the echo of ``payload`` on a new session."""
    start = time.perf_counter()
    session = await Session.open(host, port, secret, timeout=timeout)
    try:
        await session.send(payload)
        got = await asyncio.wait_for(session.recv(), timeout)
        if got != payload:
            raise ConnectionError("echo mismatch")
        return time.perf_counter() - start
    finally:
        await session.close()


async def throughput(host: str, port: int, secret: str, sessions: int, duration: float, size: int, window: int) -> dict:
    opened = await asyncio.gather(*(Session.open(host, port, secret) for _ in range(sessions)))
    # One small round trip each first: every session is relayed to the data centre.
    for session in opened:
        await session.send(b"warm")
        if await session.recv() != b"warm":
            raise ConnectionError("echo mismatch")
    payload = os.urandom(size)
    echoed = [0] * sessions
    mismatches = 0
    usage = ClientUsage()
    deadline = time.monotonic() + duration

    async def one(i: int, session: Session) -> None:
        nonlocal mismatches
        in_flight = asyncio.Semaphore(max(1, window // size))
        sent, stopped = 0, False

        async def reader() -> None:
            nonlocal mismatches
            while not (stopped and echoed[i] >= sent * size):
                got = await session.recv()
                if got != payload:
                    mismatches += 1
                echoed[i] += len(got)
                in_flight.release()

        task = asyncio.create_task(reader())
        while time.monotonic() < deadline:
            await in_flight.acquire()
            sent += 1
            await session.send(payload)
        stopped = True
        if echoed[i] >= sent * size:
            task.cancel()  # every echo is in; the reader waits for nothing
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:
            await task

    start = time.monotonic()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(opened)))
    elapsed = time.monotonic() - start
    client = usage.report()
    for session in opened:
        await session.close()
    total = sum(echoed)
    return {
        "mode": "throughput",
        "sessions": sessions,
        "size": size,
        "window": window,
        "bytes": total,
        "seconds": round(elapsed, 3),
        "mib_per_s": round(total / elapsed / 2**20, 1),
        "per_session_mib": [round(b / 2**20, 1) for b in echoed],
        "mismatches": mismatches,
        "client": client,
    }


async def closed_loop(host: str, port: int, secret: str, duration: float, concurrency: int, timeout: float) -> dict:
    timed, usage = Timed(), ClientUsage()
    deadline = time.monotonic() + duration
    payload = b"ping" * 4

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                timed.latencies.append(await echo_once(host, port, secret, timeout, payload))
            except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
                timed.fail(exc)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    return {"mode": "sessions", "concurrency": concurrency, **timed.report(elapsed), "client": usage.report()}


async def open_loop(host: str, port: int, secret: str, duration: float, rate: float, timeout: float) -> dict:
    payload = b"ping" * 4

    async def attempt() -> float:
        return await echo_once(host, port, secret, timeout, payload)

    errors = (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError)
    return await paced("open", attempt, errors, duration, rate, timeout)


async def rtt(host: str, port: int, secret: str, count: int, size: int, timeout: float) -> dict:
    session = await Session.open(host, port, secret, timeout=timeout)
    payload = os.urandom(size)
    times, mismatches = [], 0
    usage = ClientUsage()
    try:
        for _ in range(count):
            start = time.perf_counter()
            await session.send(payload)
            got = await asyncio.wait_for(session.recv(), timeout)
            times.append((time.perf_counter() - start) * 1000)
            mismatches += got != payload
    finally:
        client = usage.report()
        await session.close()
    return {
        "mode": "rtt",
        "count": len(times),
        "size": size,
        "mismatches": mismatches,
        "rtt_ms": summary(times, percentiles=(50, 90, 99), digits=4),
        "client": client,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("throughput", "sessions", "open", "rtt"))
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("secret", help="32 hex characters (no dd prefix)")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--sessions", type=int, default=1, help="throughput: parallel sessions")
    parser.add_argument("--concurrency", type=int, default=16, help="sessions: workers")
    parser.add_argument("--rate", type=float, default=100.0, help="open: new sessions per second")
    parser.add_argument("--size", type=int, default=65536, help="packet payload bytes (a multiple of 4)")
    parser.add_argument("--window", type=int, default=4 << 20, help="throughput: bytes in flight per session")
    parser.add_argument("--count", type=int, default=2000, help="rtt: packets")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.size % 4:
        parser.error("--size must be a multiple of 4")
    host, _, port_text = args.target.rpartition(":")
    port = int(port_text)
    raise_nofile(4096)
    if args.mode == "throughput":
        report = asyncio.run(throughput(host, port, args.secret, args.sessions, args.duration, args.size, args.window))
    elif args.mode == "sessions":
        report = asyncio.run(closed_loop(host, port, args.secret, args.duration, args.concurrency, args.timeout))
    elif args.mode == "open":
        report = asyncio.run(open_loop(host, port, args.secret, args.duration, args.rate, args.timeout))
    else:
        report = asyncio.run(rtt(host, port, args.secret, args.count, args.size, args.timeout))
    report["client"]["saturated"] = saturated(report["client"])
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
