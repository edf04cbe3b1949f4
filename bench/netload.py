"""The benchmarks' TCP client: run in a test host's client namespace, prints one JSON report.

Modes (``netload.py MODE HOST:PORT ...``):

- ``rate``: closed loop, ``--concurrency`` workers each connect, read the
  first byte, close, again, for ``--duration`` s: the most new connections per
  second this client gets through.
- ``latency``: open loop, ``--rate`` new connections per second for
  ``--duration`` s; each is timed from connect() to its first byte. With
  ``--handshake SECRET`` it sends a valid MTProto (obfuscated2, padded)
  handshake instead and is timed to the replica's answer (mtprotoproxy closes
  the connection once Telegram turns out unreachable).
- ``bulk``: one connection asks the bench backend for ``--bytes`` and reads them.
- ``hold``: opens ``--count`` idle connections at ``--rate`` per second,
  prints ``{"event": "ready", ...}`` on stderr, keeps them until SIGTERM, then
  reports how many were still open.

Every report has a ``client`` block (:class:`loadgen.ClientUsage`): its CPU
use of one core, how late the open-loop schedule ran, its open-files limit.
A client near 100 % CPU, or with a late schedule, measured itself, not the cell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadgen import ClientUsage, LoadGen, raise_nofile
from mtproto import handshake

from bench.stats import summary

# The bench backend's greeting (bench/backend.py); its bulk request line.
GREETING = b"H"
# A client "near saturation": its numbers are then a floor, not the cell's.
SATURATED_CPU_PERCENT = 85.0


class Timed:
    """Connection timings and failures of one run."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    def fail(self, exc: BaseException) -> None:
        reason = LoadGen._reason(exc)
        self.errors[reason] = self.errors.get(reason, 0) + 1

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def report(self, elapsed: float) -> dict:
        ms = [v * 1000 for v in self.latencies]
        return {
            "ok": len(self.latencies),
            "failed": self.failed,
            "errors": self.errors,
            "per_s": round(len(self.latencies) / elapsed, 1) if elapsed else 0.0,
            "latency_ms": summary(ms, percentiles=(50, 90, 99)) if ms else None,
        }


async def first_answer(host: str, port: int, timeout: float, payload: bytes | None = None) -> float:
    """Seconds from connect() to the first byte (or, after ``payload``, to the
    peer's answer, data or close)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            if payload is not None:
                await loop.sock_sendall(sock, payload)
                with contextlib.suppress(ConnectionResetError):
                    await loop.sock_recv(sock, 1)
            elif not await loop.sock_recv(sock, 1):
                raise ConnectionError("eof")
        return time.perf_counter() - start
    finally:
        sock.close()


async def closed_loop(host: str, port: int, duration: float, concurrency: int, timeout: float) -> dict:
    timed, usage = Timed(), ClientUsage()
    deadline = time.monotonic() + duration

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                timed.latencies.append(await first_answer(host, port, timeout))
            except (OSError, TimeoutError, ConnectionError) as exc:
                timed.fail(exc)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    return {"mode": "rate", "concurrency": concurrency, **timed.report(elapsed), "client": usage.report()}


async def paced(
    mode: str, attempt: Callable[[], Awaitable[float]], errors: tuple, duration: float, rate: float, timeout: float
) -> dict:
    """Open loop: start ``attempt`` (which returns its latency) ``rate`` times a
    second for ``duration`` s, whatever the earlier ones are doing, so a slow
    server shows as latency, not as a lower offered rate."""
    timed, usage = Timed(), ClientUsage()
    tasks: set[asyncio.Task] = set()

    async def one() -> None:
        try:
            timed.latencies.append(await attempt())
        except errors as exc:
            timed.fail(exc)

    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - start < duration:
        due = start + sent / rate
        if now < due:
            await asyncio.sleep(due - now)
            continue
        usage.late(now - due)
        sent += 1
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    elapsed = time.monotonic() - start
    if tasks:
        await asyncio.wait(tasks, timeout=timeout * 2)
    return {
        "mode": mode,
        "target_rate": rate,
        "sent": sent,
        "achieved_rate": round(sent / elapsed, 1),
        **timed.report(elapsed),
        "client": usage.report(),
    }


async def open_loop(host: str, port: int, duration: float, rate: float, timeout: float, secret: str | None) -> dict:
    async def attempt() -> float:
        return await first_answer(host, port, timeout, handshake(secret) if secret else None)

    return await paced("latency", attempt, (OSError, TimeoutError, ConnectionError), duration, rate, timeout)


def bulk(host: str, port: int, size: int, timeout: float) -> dict:
    usage = ClientUsage()
    buf = bytearray(1 << 20)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if sock.recv(1) != GREETING:
            raise ConnectionError("no greeting")
        start = time.perf_counter()
        sock.sendall(b"bulk %d\n" % size)
        got = 0
        while got < size:
            n = sock.recv_into(buf)
            if not n:
                break
            got += n
        elapsed = time.perf_counter() - start
    return {
        "mode": "bulk",
        "bytes": got,
        "complete": got == size,
        "seconds": round(elapsed, 4),
        "mib_per_s": round(got / elapsed / 2**20, 1),
        "client": usage.report(),
    }


async def hold(host: str, port: int, count: int, rate: float, timeout: float) -> dict:
    usage = ClientUsage()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    socks: list[socket.socket] = []
    failures = Timed()

    async def open_one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
            socks.append(sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            failures.fail(exc)

    start = time.monotonic()
    pending: set[asyncio.Task] = set()
    for i in range(count):
        due = start + i / rate
        if (now := time.monotonic()) < due:
            await asyncio.sleep(due - now)
        usage.late(max(0.0, time.monotonic() - due))
        task = asyncio.create_task(open_one())
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)
    opened_in = time.monotonic() - start
    print(json.dumps({"event": "ready", "open": len(socks), "failed": failures.failed}), file=sys.stderr, flush=True)
    await stop.wait()
    alive = 0
    for sock in socks:
        try:
            alive += sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
        except BlockingIOError:
            alive += 1  # open and silent, as it should be
        except OSError:
            pass
        sock.close()
    return {
        "mode": "hold",
        "wanted": count,
        "opened": len(socks),
        "failed_open": failures.failed,
        "errors": failures.errors,
        "open_seconds": round(opened_in, 2),
        "alive_at_end": alive,
        "client": usage.report(),
    }


def saturated(client: dict) -> bool:
    return client["cpu_percent"] >= SATURATED_CPU_PERCENT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("rate", "latency", "bulk", "hold"))
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=100.0, help="latency: new per second; hold: opened per second")
    parser.add_argument("--handshake", metavar="SECRET", help="latency: send an MTProto handshake for this secret")
    parser.add_argument("--bytes", type=int, default=2**30)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    host, _, port_text = args.target.rpartition(":")
    port = int(port_text)
    raise_nofile(args.count + args.concurrency + 1024)
    if args.mode == "rate":
        report = asyncio.run(closed_loop(host, port, args.duration, args.concurrency, args.timeout))
    elif args.mode == "latency":
        report = asyncio.run(open_loop(host, port, args.duration, args.rate, args.timeout, args.handshake))
    elif args.mode == "bulk":
        report = bulk(host, port, args.bytes, args.timeout)
    else:
        report = asyncio.run(hold(host, port, args.count, args.rate, args.timeout))
    report["client"]["saturated"] = saturated(report["client"])
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
