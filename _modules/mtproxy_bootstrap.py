"""Where the formula's Python modules go, and whether the running Salt can use them.

Our modules import the Docker SDK and pyroute2, and the Docker states come
from the Salt extension ``saltext-dockermod``. They must be importable by the
Python that runs Salt:

- ``salt`` target: Salt runs from a Python of its own (onedir, a venv), as a
  minion or ``salt-call`` does: ``mtproxy.engine`` pip-installs them there
  and reloads the modules, in the same apply.
- ``venv`` target: Salt runs from a system Python that pip must not touch
  (PEP 668, Debian's ``/usr/bin/python3``), as salt-ssh does on a bare host.
  ``mtproxy.bootstrap`` makes a dedicated venv (``python_packages:venv``)
  from that Python and installs them there; the roster's ``set_path`` puts
  the venv's ``bin`` first, so every later salt-ssh run (and the boot units,
  which use the Python that ran Salt) runs in it. Salt itself comes with the
  thin each run, so a Salt extension goes in without its dependencies.

``auto`` (the default) picks ``venv`` when Salt runs in that venv or from an
externally managed Python, else ``salt``.

CLI Example::

    salt-ssh mtproxy1 mtproxy_bootstrap.plan
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from typing import Any

from salt.exceptions import CommandExecutionError

__virtualname__ = "mtproxy_bootstrap"

DEFAULTS = {"install": True, "target": "auto", "venv": "/opt/mtproxy/venv", "pkgs": [], "find_links": ""}
REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class NotBootstrapped(CommandExecutionError):
    """Salt runs from a Python the formula's modules cannot go into during this apply."""


def __virtual__():
    return __virtualname__


def is_extension(requirement: str) -> bool:
    """A Salt extension (saltext.*): it depends on Salt, which the thin carries."""
    match = REQUIREMENT_NAME.match(requirement)
    return bool(match) and re.sub(r"[-_.]+", "-", match[0].lower()).startswith("saltext-")


def _externally_managed() -> bool:
    if sys.prefix != sys.base_prefix:
        return False
    return os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))


def _same(path_a: str, path_b: str) -> bool:
    return os.path.realpath(path_a) == os.path.realpath(path_b)


def plan(python_packages: dict[str, Any] | None = None) -> dict[str, Any]:
    """
    Where ``python_packages`` (the pillar group ``mtproxy:python_packages``) go.

    Returns ``target`` (``salt`` or ``venv``), ``venv``, ``in_venv`` (Salt
    runs in it now), ``base_python`` (the interpreter that makes the venv),
    ``python`` (the one running Salt), and the requirements split into
    ``pkgs`` and ``extensions`` (installed without dependencies in a venv).

    CLI Example:

    .. code-block:: bash

        salt-call mtproxy_bootstrap.plan '{"target": "auto"}'
    """
    settings = {**DEFAULTS, **(python_packages or {})}
    venv = settings["venv"]
    in_venv = bool(venv) and _same(sys.prefix, venv)
    target = settings["target"]
    if target == "auto":
        target = "venv" if in_venv or _externally_managed() else "salt"
    pkgs = [p for p in settings["pkgs"] if not is_extension(p)]
    extensions = [p for p in settings["pkgs"] if is_extension(p)]
    major, minor = sys.version_info[:2]
    base = os.path.join(sys.base_prefix, "bin", f"python{major}.{minor}")
    if not os.path.exists(base):
        base = os.path.join(sys.base_prefix, "bin", "python3")
    return {
        "target": target,
        "venv": venv,
        "in_venv": in_venv,
        "python": sys.executable,
        "base_python": base,
        "pkgs": pkgs,
        "extensions": extensions,
    }


def check(
    python_packages: dict[str, Any] | None = None,
    bootstrapping: bool = False,
    command: str = "state.apply mtproxy.bootstrap",
) -> dict[str, Any]:
    """
    :func:`plan`, after failing unless this apply can make the formula's modules usable.

    With the ``venv`` target, the modules work only once Salt runs in the
    venv, which takes a new salt-ssh run: an apply of the whole formula from
    any other Python stops here, at render time, before anything on the host
    changes, with one line naming what to run first. ``bootstrapping``: the
    bootstrap itself renders, nothing to check.

    CLI Example:

    .. code-block:: bash

        salt-ssh mtproxy1 mtproxy_bootstrap.check
    """
    settings = {**DEFAULTS, **(python_packages or {})}
    found = plan(settings)
    if bootstrapping or not settings["install"] or found["target"] != "venv" or found["in_venv"]:
        return found
    venv = found["venv"]
    if os.path.exists(os.path.join(venv, "bin", "python3")):
        raise NotBootstrapped(
            f"mtproxy: Salt runs with {found['python']}, not in the bootstrapped venv {venv}:"
            f" put {venv}/bin first on the roster's set_path (mtproxy:python_packages:venv)"
        )
    raise NotBootstrapped(
        f"mtproxy is not bootstrapped on this host (Salt runs with {found['python']}, which pip must not"
        f" change): run `{command}` first, with {venv}/bin first on the roster's set_path; nothing was changed"
    )


def resolve(settings: dict[str, Any], bootstrapping: bool = False) -> dict[str, Any]:
    """
    ``mtproxy.resolve`` behind :func:`check`, in one call (``mtproxy.settings``').

    The check comes first, so an apply refused there has not generated the
    secret; the bootstrap generates none. ``boot:python``, when empty, becomes
    the Python that runs Salt now: salt-ssh caches grains for an hour, so
    ``pythonexecutable`` can still name the system python3 after the
    bootstrap moved Salt into the venv. One call, not two: under salt-ssh
    ``mtproxy.settings`` runs on the master, and each call to the target is a
    round trip over ssh.

    CLI Example:

    .. code-block:: bash

        salt-call mtproxy_bootstrap.resolve '{"replicas": 2, ...}'
    """
    # A bad pillar is refused naming its key before the check reads it.
    valid = __salt__["mtproxy_schema.validate"](settings)
    found = check(valid["python_packages"], bootstrapping=bootstrapping)
    resolved = __salt__["mtproxy.resolve"](settings, generate_secret=not bootstrapping)
    if not resolved["boot"]["python"]:
        resolved["boot"]["python"] = found["python"]
    return resolved
