"""A dedicated venv holding the formula's Python modules (salt-ssh on a system Python).

Used by ``mtproxy.bootstrap`` when ``mtproxy_bootstrap.plan`` says ``venv``:
the venv is made with the system Python (``python3 -m venv``; Debian needs
``python3-venv`` for that) and the requirements go in with the venv's own
pip, never the system's: nothing outside the venv changes. This does not
use ``pip.installed``, which needs pip importable in the Python running Salt
(a bare Debian's python3 has none).

.. code-block:: yaml

    The formula's Python modules are in their venv:
      mtproxy_bootstrap.venv_present:
        - name: /opt/mtproxy/venv
        - base_python: /usr/bin/python3.11
        - pkgs: [docker, pyroute2]
        - extensions: [saltext.dockermod]   # installed with --no-deps
        - find_links: ''                    # a wheel folder or URL: no index then
"""

from __future__ import annotations

import json
import os
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

__virtualname__ = "mtproxy_bootstrap"


def __virtual__():
    return __virtualname__


def _run(cmd: list[str]) -> dict:
    return __salt__["cmd.run_all"](cmd, python_shell=False, env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _installed(python: str) -> dict[str, str]:
    out = _run([python, "-m", "pip", "list", "--format=json"])
    if out["retcode"] != 0:
        raise RuntimeError(f"{python} -m pip list failed: {out['stderr'].strip()[-500:]}")
    return {canonicalize_name(p["name"]): p["version"] for p in json.loads(out["stdout"])}


def _missing(requirements: list[str], installed: dict[str, str]) -> list[str]:
    missing = []
    for text in requirements:
        requirement = Requirement(text)
        version = installed.get(canonicalize_name(requirement.name))
        if version is None or (requirement.specifier and not requirement.specifier.contains(version, prereleases=True)):
            missing.append(text)
    return missing


def venv_present(
    name: str,
    base_python: str,
    pkgs: list[str] | None = None,
    extensions: list[str] | None = None,
    find_links: str = "",
) -> dict[str, Any]:
    """The venv ``name`` exists and holds ``pkgs`` (with their dependencies) and ``extensions`` (without)."""
    ret: dict[str, Any] = {"name": name, "result": True, "changes": {}, "comment": ""}
    pkgs, extensions = list(pkgs or []), list(extensions or [])
    try:
        for text in pkgs + extensions:
            Requirement(text)
    except InvalidRequirement as exc:
        return {**ret, "result": False, "comment": f"Not a pip requirement: {exc}"}
    python = os.path.join(name, "bin", "python3")
    exists = os.path.exists(python)
    if exists:
        try:
            installed = _installed(python)
        except RuntimeError as exc:
            return {**ret, "result": False, "comment": str(exc)}
    else:
        installed = {}
    missing, missing_ext = _missing(pkgs, installed), _missing(extensions, installed)
    if exists and not missing and not missing_ext:
        return {**ret, "comment": f"venv {name} holds {', '.join(pkgs + extensions)}"}

    would = {"installed": missing + missing_ext} if missing or missing_ext else {}
    if not exists:
        would = {"venv": f"created with {base_python}", **would}
    if __opts__["test"]:
        return {**ret, "result": None, "changes": would, "comment": f"venv {name} would be prepared"}

    if not exists:
        out = _run([base_python, "-m", "venv", name])
        if out["retcode"] != 0:
            detail = (out["stderr"] or out["stdout"]).strip()[-800:]
            return {**ret, "result": False, "comment": f"{base_python} -m venv {name} failed: {detail}"}
    source = ["--no-index", "--find-links", find_links] if find_links else []
    for group, extra in ((missing, []), (missing_ext, ["--no-deps"])):
        if not group:
            continue
        out = _run([python, "-m", "pip", "install", "--no-input", *source, *extra, *group])
        if out["retcode"] != 0:
            detail = (out["stderr"] or out["stdout"]).strip()[-800:]
            changes = {"venv": would["venv"]} if not exists else {}
            return {**ret, "result": False, "changes": changes, "comment": f"pip install {group} failed: {detail}"}
    left = _missing(pkgs + extensions, _installed(python))
    if left:
        return {**ret, "result": False, "changes": would, "comment": f"still missing after pip install: {left}"}
    return {**ret, "changes": would, "comment": f"venv {name} prepared"}
