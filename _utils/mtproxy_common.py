"""What the formula's modules share, defined once.

Salt puts ``_utils`` (synced with the other custom modules; salt-ssh ships it
too) on ``sys.path`` while it loads execution and state modules, so they
import this file by name: ``import mtproxy_common``. The two modules that
also run as scripts on a Python that may lack Salt (``tproxy.py``: the boot
and watchdog units; ``haproxy_runtime.py``: ``check_cmd`` and the exporter)
find it beside them (``config_dir/bin``, where the states copy it) or next to
their own folder (Salt's extension modules, the formula's tree).

Its constants load with the process: a minion daemon picks up changes here
on restart.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

try:
    from salt.exceptions import CommandExecutionError, SaltInvocationError
except ImportError:  # a script on a Python without Salt: the same interface

    class CommandExecutionError(Exception):  # type: ignore[no-redef]
        def __init__(self, message="", info=None):
            super().__init__(message)
            self.error = message
            self.info = info

    class SaltInvocationError(Exception):  # type: ignore[no-redef]
        pass


# How a secret (or any credential) appears in errors, comments and mtproxy.settings.
HIDDEN = "<hidden>"
# HAProxy's frontend, as haproxy.cfg.jinja names it.
FRONTEND = "mtproxy"
# Client protocols (mtproxy:modes), in the order the settings list them.
MODES = ("classic", "secure", "tls")

# -- the return path (transparent mode) ----------------------------------------------

# The return path's name: our mangle rules' comment says it.
RETURN_PATH_NAME = "mtproxy"
METHODS = ("mark", "sport")
FAMILIES = {"ipv4": ("ipv4",), "ipv6": ("ipv6",), "both": ("ipv4", "ipv6")}
# Routing tables the kernel uses itself.
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
# The routing protocol number that marks our rules and routes.
DEFAULT_TAG = 201
# The boot and watchdog units' files: settings and script in config_dir, status in run_dir.
RETURN_PATH_CONFIG = "return-path.json"
RETURN_PATH_STATUS = "return-path.status"
SCRIPT_DIR = "bin"
SHARED_FILE = "mtproxy_common.py"  # this file, copied beside the scripts


def return_path(cell: dict[str, Any], ports: Iterable[int] | None = None) -> dict[str, Any]:
    """Everything that describes ``cell``'s return path (resolved settings).

    ``arguments``: those of ``tproxy.present``/``tproxy.check`` and of the
    boot unit's settings file, for ``ports`` (default: the cell's). The
    files: ``config`` (those arguments as JSON), ``script`` (tproxy.py) and
    ``shared`` (this file, beside it), ``status`` (the watchdog's), ``unit``
    and ``watchdog_unit``. The units' commands: ``ensure`` and ``watch``.
    """
    tproxy, boot = cell["tproxy"], cell["boot"]
    scripts = f"{cell['config_dir']}/{SCRIPT_DIR}"
    config = f"{cell['config_dir']}/{RETURN_PATH_CONFIG}"
    status = f"{cell['run_dir']}/{RETURN_PATH_STATUS}"
    script = f"{scripts}/tproxy.py"
    # boot:python is filled in by mtproxy_bootstrap.resolve; the Python running Salt otherwise.
    python = boot["python"] or sys.executable
    return {
        "arguments": {
            "name": RETURN_PATH_NAME,
            "ports": sorted(set(cell["ports"] if ports is None else ports)),
            "method": tproxy["method"],
            "mark": tproxy["mark"],
            "table": tproxy["table"],
            "family": tproxy["family"],
        },
        "config": config,
        "script": script,
        "shared": f"{scripts}/{SHARED_FILE}",
        "status": status,
        "unit": f"{boot['unit_dir']}/{boot['unit_name']}",
        "watchdog_unit": f"{boot['unit_dir']}/{boot['watchdog_unit_name']}",
        "ensure": f"{python} {script} ensure --config {config}",
        "watch": f"{python} {script} watch --config {config} --interval {boot['watch_interval']} --status {status}",
    }
