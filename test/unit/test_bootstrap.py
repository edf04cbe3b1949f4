"""Where mtproxy_bootstrap puts the formula's Python modules, and when it refuses an apply.

The Python running Salt is stubbed (sys.prefix, sys.base_prefix, the PEP 668
marker); test/integration/test_salt_ssh_bare.py runs the same against a real
salt-ssh target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from modules import execution_module, state_module

bootstrap = execution_module("mtproxy_bootstrap")
state = state_module("mtproxy_bootstrap")


@pytest.fixture
def configure_loader_modules():
    """Salt's loader dunders, fresh for each test (pytest-salt-factories)."""
    return {bootstrap: {"__salt__": {}}}


PKGS = ["docker", "pyroute2>=0.9", "saltext.dockermod"]


@pytest.fixture
def python(monkeypatch, tmp_path):
    """Make the running Python look like ``kind``: system (PEP 668), system-unmanaged, venv, other-venv."""

    def become(kind: str) -> Path:
        venv = tmp_path / "venv"
        prefix = {"venv": str(venv), "other-venv": str(tmp_path / "other")}.get(kind, "/usr")
        monkeypatch.setattr(sys, "prefix", prefix)
        monkeypatch.setattr(sys, "base_prefix", "/usr")
        monkeypatch.setattr(bootstrap, "_externally_managed", lambda: kind == "system")
        return venv

    return become


@pytest.mark.parametrize(
    ("kind", "target"),
    [("system", "venv"), ("venv", "venv"), ("system-unmanaged", "salt"), ("other-venv", "salt")],
)
def test_auto_picks_the_venv_for_an_externally_managed_python_or_inside_the_venv(python, kind, target):
    venv = python(kind)
    found = bootstrap.plan({"venv": str(venv), "pkgs": PKGS})
    assert found["target"] == target
    assert found["in_venv"] is (kind == "venv")
    # Salt extensions go in without their dependency, Salt (the thin carries it).
    assert found["pkgs"] == ["docker", "pyroute2>=0.9"]
    assert found["extensions"] == ["saltext.dockermod"]


def test_an_explicit_target_wins(python):
    venv = python("system")
    assert bootstrap.plan({"venv": str(venv), "target": "salt"})["target"] == "salt"
    python("system-unmanaged")
    assert bootstrap.plan({"venv": str(venv), "target": "venv"})["target"] == "venv"


def test_an_apply_from_the_system_python_before_the_bootstrap_names_the_command(python):
    venv = python("system")
    with pytest.raises(bootstrap.NotBootstrapped) as error:
        bootstrap.check({"venv": str(venv), "pkgs": PKGS})
    message = str(error.value)
    assert "\n" not in message
    assert "not bootstrapped" in message and "run `state.apply mtproxy.bootstrap` first" in message
    assert f"{venv}/bin first on the roster's set_path" in message


def test_a_bootstrapped_venv_that_salt_does_not_run_in_names_set_path(python):
    venv = python("system")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").touch()
    with pytest.raises(bootstrap.NotBootstrapped, match=f"put {venv}/bin first on the roster's set_path"):
        bootstrap.check({"venv": str(venv)})


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("venv", {}),  # salt-ssh after the bootstrap
        ("system-unmanaged", {}),  # a Python pip may change: engine installs in the same apply
        ("system", {"install": False}),  # the operator installs them
        ("system", {"target": "salt"}),  # told so
    ],
)
def test_nothing_is_refused_where_the_apply_can_load_the_modules(python, kind, settings):
    venv = python(kind)
    found = bootstrap.check({"venv": str(venv), **settings})
    assert found["python"] == sys.executable


def test_the_bootstrap_itself_is_never_refused(python):
    venv = python("system")
    assert bootstrap.check({"venv": str(venv)}, bootstrapping=True)["target"] == "venv"


@pytest.mark.parametrize(
    ("requirement", "extension"),
    [("saltext.dockermod", True), ("saltext-dockermod>=0.1", True), ("Saltext_Foo", True), ("docker", False)],
)
def test_salt_extensions_are_told_by_name(requirement, extension):
    assert bootstrap.is_extension(requirement) is extension


def test_missing_requirements_by_name_and_version():
    installed = {"docker": "7.1.0", "pyroute2": "0.7.2", "saltext-dockermod": "0.1.3"}
    assert state._missing(["docker", "pyroute2>=0.9", "saltext.dockermod", "requests"], installed) == [
        "pyroute2>=0.9",
        "requests",
    ]


def test_resolve_refuses_before_resolving_and_fills_the_boot_python(python):
    venv = python("system")
    calls = []
    salt = {
        "mtproxy_schema.validate": lambda s: calls.append("validate") or s,
        "mtproxy.resolve": lambda s, generate_secret: calls.append(("resolve", generate_secret))
        or {"boot": {"python": ""}},
    }
    bootstrap.__salt__.update(salt)
    settings = {"python_packages": {**bootstrap.DEFAULTS, "venv": str(venv)}}
    with pytest.raises(bootstrap.NotBootstrapped):
        bootstrap.resolve(settings)
    assert calls == ["validate"]  # no secret generated
    resolved = bootstrap.resolve(settings, bootstrapping=True)
    assert calls[-1] == ("resolve", False)
    assert resolved["boot"]["python"] == sys.executable
