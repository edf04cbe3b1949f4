"""Fixtures shared by every test: isolated test hosts (see testhost.py)."""

from __future__ import annotations

import itertools
import os

import pytest
from testhost import Segment, TestHost, leftovers, sweep

_labels = itertools.count(1)


def pytest_sessionstart(session):
    # A run that was interrupted may have left hosts behind; they are ours.
    if os.geteuid() == 0:
        sweep()


@pytest.fixture(scope="session")
def make_testhost():
    """Factory: ``make_testhost(docker=True)`` starts a fresh host, torn down at session end.

    Call ``host.stop()`` earlier to free it sooner; stopping twice is harmless.
    """
    hosts: list[TestHost] = []

    def factory(label: str | None = None, docker: bool = True, load_images: bool = True) -> TestHost:
        label = label or f"t{os.getpid() % 10000}-{next(_labels)}"
        host = TestHost.create(label)
        hosts.append(host)
        return host.start(docker=docker, load_images=load_images)

    yield factory
    for host in hosts:
        host.stop()


@pytest.fixture(scope="module")
def testhost(make_testhost):
    """A test host with its own dockerd and our images, shared by one test module."""
    host = make_testhost()
    yield host
    host.stop()


@pytest.fixture
def netns_host(make_testhost):
    """A bare test host (namespaces and veth only, no dockerd) for one test."""
    host = make_testhost(docker=False)
    yield host
    host.stop()


def pytest_sessionfinish(session, exitstatus):
    left = leftovers(owner=os.getpid()) if os.geteuid() == 0 else []
    if left:
        print("\nmtproxy-formula: test hosts left behind:\n  " + "\n  ".join(left))
        session.exitstatus = 1


@pytest.fixture(scope="module")
def segment(make_testhost):
    """A shared Ethernet segment (testhost.Segment) in a switch host of its own,
    with a client; test hosts join it with ``segment.join(host)``. One test module."""
    switch = make_testhost(docker=False)
    yield Segment(switch)
    switch.stop()
