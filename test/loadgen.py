"""A small TCP load generator: a rate of new connections plus long-lived ones.

Meant for reload, drain, failover tests and benchmarks through HAProxy, run
inside a test host's client namespace::

    nsenter --net=/run/netns/NAME-c python3 test/loadgen.py 198.18.1.1:8443 \\
        --rate 50 --long 20 --interval 0.1 --duration 30

Each new connection connects, optionally reads a banner line (``--banner``:
the tests' backends greet with their name), sends one byte and expects it
echoed (unless ``--no-echo``), then closes. Each long-lived connection does
the same exchange every ``--interval`` seconds until the end. A peer that
closes, resets or stays silent for ``--timeout`` seconds is a failure.

It runs for ``--duration`` seconds (0: until SIGTERM/SIGINT), or until
``--count`` new connections are done, then prints one JSON report on stdout
(see :func:`LoadGen.report`). With ``--long``, a line ``{"event": "ready"}``
goes to stderr once every long-lived connection is open.

Importable too: ``asyncio.run(LoadGen(host, port, rate=50).run(duration=10))``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field


class ClientUsage:
    """What this client process itself used since it was made: a saturated client
    (one core busy, schedule slipping) must not be mistaken for a slow server."""

    def __init__(self) -> None:
        self.wall0 = time.monotonic()
        self.cpu0 = self._cpu()
        self.lag_max = 0.0

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def late(self, seconds: float) -> None:
        """Note how late a scheduled action started."""
        self.lag_max = max(self.lag_max, seconds)

    def report(self) -> dict:
        wall = time.monotonic() - self.wall0
        cpu = self._cpu() - self.cpu0
        return {
            "pid": os.getpid(),
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            # Of one core: a single asyncio loop cannot use more than 100.
            "cpu_percent": round(100 * cpu / wall, 1) if wall else 0.0,
            "schedule_lag_max_s": round(self.lag_max, 4),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        }


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-files limit towards ``wanted``, up to the hard
    limit (raising that needs CAP_SYS_RESOURCE, which a sandbox may not give
    even to root); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Stats:
    attempted: int = 0
    ok: int = 0
    failed: int = 0
    errors: Counter = field(default_factory=Counter)
    banners: Counter = field(default_factory=Counter)
    max_latency: float = 0.0
    failed_started: list = field(default_factory=list)
    failed_at: list = field(default_factory=list)


class LoadGen:
    def __init__(
        self,
        host: str,
        port: int,
        rate: float = 50,
        long: int = 0,
        interval: float = 0.1,
        timeout: float = 3.0,
        banner: bool = False,
        echo: bool = True,
        count: int | None = None,
        hold: float = 0.0,
    ):
        self.host, self.port = host, port
        self.rate, self.long, self.interval, self.timeout = rate, long, interval, timeout
        self.banner, self.echo, self.count, self.hold = banner, echo, count, hold
        self.new = Stats()
        self.long_stats = Stats()
        self.long_alive = 0
        self.exchanges = 0
        self.stop = asyncio.Event()
        self.started = 0.0
        self.elapsed = 0.0
        self.usage = ClientUsage()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str | None]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        name = None
        if self.banner:
            line = await asyncio.wait_for(reader.readline(), self.timeout)
            if not line.endswith(b"\n"):
                writer.close()
                raise ConnectionError("eof before banner")
            name = line.decode(errors="replace").strip()
        return reader, writer, name

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait: float = 0.0) -> None:
        if not self.echo:
            if self.hold:
                await self._silent(reader, wait)
            return
        writer.write(b"x")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1), self.timeout)
        if data != b"x":
            raise ConnectionError("eof" if not data else "wrong echo")

    @staticmethod
    async def _silent(reader: asyncio.StreamReader, wait: float) -> None:
        """Connect-only mode (``--hold``): the peer must keep the connection open, silent, for ``wait`` seconds."""
        try:
            data = await asyncio.wait_for(reader.read(1), max(wait, 0.001))
        except TimeoutError:
            return
        raise ConnectionError("eof" if not data else "unexpected data")

    @staticmethod
    def _reason(exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return "timeout"
        if isinstance(exc, ConnectionError) and exc.args and isinstance(exc.args[0], str):
            return exc.args[0]
        return type(exc).__name__

    async def _one_new(self) -> None:
        start = time.monotonic()
        started_at = time.time()
        writer = None
        try:
            reader, writer, name = await self._open()
            await self._exchange(reader, writer, self.hold)
            self.new.ok += 1
            if name is not None:
                self.new.banners[name] += 1
            self.new.max_latency = max(self.new.max_latency, time.monotonic() - start)
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.new.failed += 1
            self.new.errors[self._reason(exc)] += 1
            self.new.failed_started.append(round(started_at, 3))
            self.new.failed_at.append(round(time.time(), 3))
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()

    async def _one_long(self, opened: asyncio.Queue) -> None:
        self.long_stats.attempted += 1
        writer = None
        try:
            try:
                reader, writer, name = await self._open()
                await self._exchange(reader, writer)
            finally:
                await opened.put(None)
            self.long_stats.ok += 1
            if name is not None:
                self.long_stats.banners[name] += 1
            self.long_alive += 1
            try:
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), self.interval)
                    # One last exchange at the stop: "survived" means still working at the end.
                    await self._exchange(reader, writer)
                    self.exchanges += 1
                    if self.stop.is_set():
                        break
            except BaseException:
                self.long_alive -= 1
                raise
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.long_stats.failed += 1
            self.long_stats.errors[self._reason(exc)] += 1
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()

    async def run(self, duration: float = 10) -> dict:
        """Run until ``duration`` (0: until :attr:`stop` is set), ``count`` or :attr:`stop`; return the report."""
        self.started = time.monotonic()
        opened: asyncio.Queue = asyncio.Queue()
        long_tasks = [asyncio.create_task(self._one_long(opened)) for _ in range(self.long)]
        announce = asyncio.create_task(self._announce(opened)) if self.long else None
        new_tasks: set[asyncio.Task] = set()
        period = 1.0 / self.rate if self.rate > 0 else None
        next_at = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if duration and now - self.started >= duration:
                break
            if self.count is not None and self.new.attempted >= self.count:
                break
            if period is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5)
                continue
            if now >= next_at:
                self.usage.late(now - next_at)
                self.new.attempted += 1
                task = asyncio.create_task(self._one_new())
                new_tasks.add(task)
                task.add_done_callback(new_tasks.discard)
                # Keep the schedule, but do not burst to catch up after a stall.
                next_at = max(next_at + period, now - period)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), next_at - now)
        self.elapsed = time.monotonic() - self.started
        if new_tasks:
            await asyncio.wait(new_tasks, timeout=self.timeout * 3)
        self.stop.set()
        if long_tasks:
            await asyncio.wait(long_tasks, timeout=self.timeout * 2)
        if announce is not None:
            announce.cancel()
        return self.report()

    async def _announce(self, opened: asyncio.Queue) -> None:
        for _ in range(self.long):
            await opened.get()
        print(json.dumps({"event": "ready", "long_open": self.long_alive}), file=sys.stderr, flush=True)

    def report(self) -> dict:
        """The outcome, as printed by the CLI.

        ``new``: attempted, ok, failed, errors (reason: count), banners
        (server name: count), rate (attempted per second achieved),
        max_latency, failed_started (wall-clock start of each failed one),
        failed_at (wall-clock time each of them failed, same order).
        ``long``: opened, failed (while opening or later), survived (still
        exchanging at the end: a last exchange is made at the stop),
        exchanges, errors, banners. ``client``: this process's own usage
        (see :class:`ClientUsage`).
        """
        return {
            "target": f"{self.host}:{self.port}",
            "duration": round(self.elapsed, 3),
            "new": {
                "attempted": self.new.attempted,
                "ok": self.new.ok,
                "failed": self.new.failed,
                "errors": dict(self.new.errors),
                "banners": dict(self.new.banners),
                "rate": round(self.new.attempted / self.elapsed, 2) if self.elapsed else 0.0,
                "max_latency": round(self.new.max_latency, 4),
                "failed_started": self.new.failed_started,
                "failed_at": self.new.failed_at,
            },
            "long": {
                "wanted": self.long,
                "opened": self.long_stats.ok,
                "failed": self.long_stats.failed,
                "survived": self.long_alive,
                "exchanges": self.exchanges,
                "errors": dict(self.long_stats.errors),
                "banners": dict(self.long_stats.banners),
            },
            "client": self.usage.report(),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--rate", type=float, default=50, help="new connections per second (0: none)")
    parser.add_argument("--long", type=int, default=0, help="long-lived connections to keep")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between exchanges on long-lived ones")
    parser.add_argument("--timeout", type=float, default=3.0, help="connect/read timeout, seconds")
    parser.add_argument("--duration", type=float, default=10, help="seconds to run; 0: until SIGTERM/SIGINT")
    parser.add_argument("--count", type=int, help="stop after this many new connections")
    parser.add_argument("--banner", action="store_true", help="read a greeting line first, count them by text")
    parser.add_argument("--no-echo", dest="echo", action="store_false", help="do not expect the byte sent echoed")
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="with --no-echo: keep each new connection open this long and count a close or reset as a failure;"
        " long-lived ones then fail when closed",
    )
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    raise_nofile(args.long + 1024)

    async def go() -> dict:
        gen = LoadGen(
            host,
            int(port),
            rate=args.rate,
            long=args.long,
            interval=args.interval,
            timeout=args.timeout,
            banner=args.banner,
            echo=args.echo,
            count=args.count,
            hold=args.hold,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gen.stop.set)
        return await gen.run(duration=args.duration)

    report = asyncio.run(go())
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
