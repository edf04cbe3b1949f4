"""Smoke tests of the foundation: isolated test hosts with real dockerd."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
from testhost import PREFIX, REPO, TestHost, leftovers, netns_list, sweep

pytestmark = pytest.mark.integration

ECHO_PORT = 4999


def test_images_are_loaded(testhost):
    images = testhost.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert "mtproxy-formula/haproxy:local" in images
    assert "mtproxy-formula/mtprotoproxy:local" in images


def test_client_reaches_a_host_network_container(testhost):
    # A tiny server on the mtprotoproxy image's Python: answer each connection with its peer address.
    server = (
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(('0.0.0.0',{ECHO_PORT}));s.listen()\n"
        "while True:\n c,a=s.accept();c.sendall(a[0].encode());c.close()"
    )
    testhost.docker(
        "run",
        "-d",
        "--name",
        "echo",
        "--network",
        "host",
        "--init",
        "--entrypoint",
        "python3",
        "mtproxy-formula/mtprotoproxy:local",
        "-c",
        server,
    )
    try:
        client = (
            "import socket,sys,time\n"
            "for _ in range(100):\n"
            " try:\n"
            f"  c=socket.create_connection(('{testhost.address}',{ECHO_PORT}),timeout=2);break\n"
            " except OSError: time.sleep(0.1)\n"
            "print(c.recv(100).decode())"
        )
        out = testhost.client_run([sys.executable, "-c", client]).stdout.strip()
        assert out == testhost.client_address
    finally:
        testhost.docker("rm", "-f", "echo", check=False)


def test_test_host_has_no_route_out(testhost):
    # A Telegram data-centre address: what a replica would dial. With no
    # route, connect() fails at once and no packet leaves the namespace.
    probe = (
        "import socket,time;t=time.monotonic()\n"
        "try:\n socket.create_connection(('149.154.167.51',443),timeout=5)\n"
        "except OSError as e: print(e.errno, round(time.monotonic()-t,3))"
    )
    errno_, elapsed = testhost.run([sys.executable, "-c", probe]).stdout.split()
    assert int(errno_) == errno.ENETUNREACH
    assert float(elapsed) < 1.0  # "at once": no timeout was waited for
    routes = testhost.run(["ip", "route", "show", "default"]).stdout
    assert routes.strip() == ""
    assert testhost.client_run(["ip", "route", "show", "default"]).stdout.strip() == ""


def test_teardown_leaves_nothing_behind(make_testhost):
    host = make_testhost()
    host.docker(
        "run",
        "-d",
        "--network",
        "host",
        "--init",
        "mtproxy-formula/mtprotoproxy:local",
        "4432",
        "0123456789abcdef0123456789abcdef",
    )
    dockerd_pid = host.dockerd_pid
    host.stop()
    assert host.netns not in netns_list()
    assert host.client_netns not in netns_list()
    assert not host.workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(dockerd_pid, 0)
    assert not [item for item in leftovers() if host.name in item]


def test_sweep_ends_a_host_left_by_a_killed_run():
    # Start a host from another process, kill that process: the host stays.
    name = f"{PREFIX}orphan"
    proc = subprocess.run(
        [sys.executable, str(REPO / "test" / "testhost.py"), "up", name], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    orphan = TestHost.load(name)
    assert name in netns_list()
    assert name in sweep()
    assert name not in netns_list()
    time.sleep(0.2)
    assert not [item for item in leftovers() if name in item]
    assert not orphan.workdir.exists()
