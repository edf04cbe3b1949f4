"""The mtprotoproxy replica image (images/mtprotoproxy/recipe.sh): mtprotoproxy
uses the faster AES module the image has, and the shim that keeps a broken
connection from logging a traceback works.

mtprotoproxy 1.0.6 names ``asyncio.streams.IncompleteReadError``, which
Python 3.9 no longer has: without the shim every relay that ends with an
error or a cancel (a client's reset, even a normal close) logged
``AttributeError: module 'asyncio.streams' has no attribute
'IncompleteReadError'`` with a traceback. Here a one-replica cell relays
real sessions to the stand-in data centre (test/standin_dc.py) and the
client namespace resets connections at every stage; the replica's
``docker logs`` must show no traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from cell import BASE_PORT, FRONTEND_PORT, apply, cell_pillar, replica_names, wait_servers_up
from standin_dc import StandIn, derive_image

pytestmark = pytest.mark.integration

SECRET = "5b0e3c9d7a1f42e8b6c0d9a3e7f15c28"
TLS_DOMAIN = "tls.example.test"
TEST_DIR = Path(__file__).resolve().parents[1]

# What mtprotoproxy chose, in the image as built: the AES module and the event loop.
CHOSEN = """
import asyncio, importlib.util, json, sys
sys.argv = ["mtprotoproxy", "config.py"]  # with no argument, importing it prints its usage and exits
sys.path.insert(0, "/usr/local/bin")
import mtprotoproxy
mtprotoproxy.try_setup_uvloop()
print(json.dumps({
    "aes": mtprotoproxy.create_aes_ctr.__qualname__.split(".")[0],
    "loop": type(asyncio.get_event_loop()).__module__,
    "pycryptodome": importlib.util.find_spec("Crypto") is not None,
}))
"""

# Run in the client namespace: ADDRESS PORT SECRET TEST_DIR TLS_DOMAIN.
# Every connection ends with a reset (SO_LINGER 0), at each stage of a session.
RESETS = r"""
import asyncio, json, socket, struct, sys
sys.path.insert(0, sys.argv[4])
from mtproto import Session, fake_tls_hello, handshake
address, port, secret, domain = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5]
LINGER_0 = struct.pack("ii", 1, 0)

def reset_after(first: bytes) -> None:
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.sendall(first)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)

async def session(packets: int, reset: bool, tls: bool = False) -> int:
    s = await Session.open(address, port, secret, tls_domain=domain if tls else "")
    echoed = 0
    for i in range(packets):
        payload = bytes(range(4, 4 + 4 * (i + 1)))
        await s.send(payload)
        echoed += await asyncio.wait_for(s.recv(), 10) == payload
    if reset:
        s.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        s.writer.transport.abort()
    else:
        await s.close()
    return echoed

reset_after(handshake(secret)[:30])                              # mid obfuscated2 handshake
reset_after(handshake(secret))                                   # handshake done, no packet yet
reset_after(fake_tls_hello(secret, domain)[:200])                # mid fake-TLS hello
echoed = [asyncio.run(session(5, reset=True)) for _ in range(3)]  # mid-session, classic/dd
echoed.append(asyncio.run(session(5, reset=True, tls=True)))      # mid-session, fake-TLS
echoed.append(asyncio.run(session(5, reset=False)))               # a normal close
print(json.dumps({"echoed": echoed}))
"""


# One more session after the resets: ADDRESS PORT SECRET -> how many packets echoed.
SESSION_AFTER = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from mtproto import Session

async def main(address, port, secret):
    s = await Session.open(address, int(port), secret)
    echoed = 0
    for i in range(5):
        await s.send(b"ping" * (i + 1))
        echoed += await asyncio.wait_for(s.recv(), 10) == b"ping" * (i + 1)
    await s.close()
    print(echoed)

asyncio.run(main(*sys.argv[2:5]))
"""
SESSION = [sys.executable, "-c", SESSION_AFTER, str(TEST_DIR)]


@pytest.fixture(scope="module")
def cell(testhost):
    image = derive_image(testhost)
    dc = StandIn(testhost)
    pillar = cell_pillar(
        testhost,
        image=image,
        replicas=1,
        secret=SECRET,
        modes=["classic", "secure", "tls"],
        tls_domain=TLS_DOMAIN,
    )
    apply(testhost, pillar)
    wait_servers_up(testhost, pillar, replica_names(1))
    yield testhost, image, dc
    dc.stop()


def replica_log(host, since: float) -> str:
    logs = host.docker("logs", "--since", f"{since:.3f}", "mtproxy_1")
    return logs.stdout + logs.stderr


def test_mtprotoproxy_runs_with_cryptography(cell):
    """`cryptography` for AES (pycryptodome is not installed), asyncio's own loop (no uvloop)."""
    host, image, _ = cell
    chosen = host.docker("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", CHOSEN).stdout
    assert json.loads(chosen) == {
        "aes": "try_use_cryptography_module",
        "loop": "asyncio.unix_events",
        "pycryptodome": False,
    }


def test_reset_connections_log_no_traceback(cell):
    """Resets mid-handshake, mid-fake-TLS and mid-session, through the cell and
    straight to the replica: sessions echo until reset, the replica logs no
    traceback and serves the next session."""
    host, _, dc = cell
    since = time.time()
    before = dc.wait_idle()["sessions"]
    args = [SECRET, str(TEST_DIR), TLS_DOMAIN]
    through_cell = host.client_run([sys.executable, "-c", RESETS, host.address, str(FRONTEND_PORT), *args])
    time.sleep(1)  # the stand-in writes its counters every 0.1 s
    middle = dc.wait_idle()["sessions"]
    # The replica listens on the host's address (transparent mode): resets from inside the host reach it unproxied.
    direct = host.run([sys.executable, "-c", RESETS, host.address, str(BASE_PORT), *args])
    time.sleep(1)  # a traceback is printed as the relay task ends
    after = dc.wait_idle()
    log = replica_log(host, since)
    for run in (through_cell, direct):
        assert json.loads(run.stdout)["echoed"] == [5] * 5, run.stdout
    # The sessions that echoed went through the replica to the stand-in and ended there.
    assert middle - before >= 5 and after["sessions"] - middle >= 5 and after["active"] == 0, (before, middle, after)
    assert "Traceback" not in log and "AttributeError" not in log, log[-3000:]
    # The replica still relays.
    assert json.loads(host.client_run([*SESSION, host.address, str(FRONTEND_PORT), SECRET]).stdout) == 5


def test_sigusr2_reloads_the_config_without_a_traceback(cell):
    """The formula reloads a replica's config with SIGUSR2: mtprotoproxy re-reads it
    (with cryptography as its AES module) and says so, without a traceback."""
    host, _, _ = cell
    since = time.time()
    host.docker("kill", "--signal", "SIGUSR2", "mtproxy_1")
    deadline = time.monotonic() + 10
    while "Config reloaded" not in (log := replica_log(host, since)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Config reloaded" in log, log[-2000:]
    assert "Traceback" not in log, log[-3000:]
