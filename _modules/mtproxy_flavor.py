"""
The MTProxy implementations ("flavors") a cell can run, one record each
(:data:`FLAVORS`), and the replica container specs made from them.

A record says everything the formula knows about a flavor: its image, where
its config folder is mounted, the config file and the function that renders
it, the entry point and command, how a config change reaches it, and the
modes and settings it supports. Adding a flavor is adding a record (and its
docs); nothing else names flavors.

- ``mtprotoproxy``: a Python config file; re-read on SIGUSR2, so a config
  change never restarts the replica.
- ``official`` (``telegrammessenger/proxy``): our wrapper
  (``mtproxy/files/official/run-mtproto-proxy.sh``), which takes the port
  from the replica's settings file like the original design's run.sh did.
  The secrets and the ad tag are in that 0600 file, never in the
  environment.
- ``mtg`` (v2): a TOML file.

The last two cannot reload: their config's digest is a container label, so a
change replaces the container through the same drain as an image change.

``mtproxy_schema.validate`` refuses what a flavor cannot do (:py:func:`check`)
and ``mtproxy/replicas.sls`` asks :py:func:`replica` how to run each replica.
Every flavor runs hardened like HAProxy (``container_options``): no
capabilities but the few it needs, ``no-new-privileges``, pids, memory and
open-files limits from ``mtproxy:replica_limits``, and a read-only root.

CLI examples:

.. code-block:: bash

    salt '*' mtproxy_flavor.show 1        # what replica 1 runs, secrets masked
    salt '*' mtproxy_flavor.record mtg    # a flavor's record
"""

# No `from __future__ import annotations`: dataclasses would then look this
# module up in sys.modules, where Salt's loader puts it only after loading it.
import dataclasses
import hashlib
import ipaddress
import json
import shlex
from collections.abc import Callable
from typing import Any

from mtproxy_common import HIDDEN, MODES  # _utils: on sys.path under Salt's loader
from salt.exceptions import CommandExecutionError

__virtualname__ = "mtproxy_flavor"

# replica_limits until the schema fills them in (pillar mtproxy:replica_limits).
DEFAULT_LIMITS = {"pids": 512, "memory": 512 * 1024 * 1024, "nofile": 16384, "read_only": True}
# Open files a replica keeps for itself (listening and stats sockets, epoll,
# its files, connections to Telegram) on top of its client connections;
# mtproto-proxy alone wants 16 more than its -c.
RESERVED_FILES = 64


def __virtual__():
    return __virtualname__


# -- renderers: the config file of one replica (cell, replica) -> text ----------------


def _mtprotoproxy_config(cell: dict, replica: dict) -> str:
    modes = cell["modes"]
    users = {("tg" if index == 0 else f"tg{index + 1}"): secret for index, secret in enumerate(cell["secrets"])}
    lines = [
        "# Managed by Salt (mtproxy-formula). mtprotoproxy reads this file as Python",
        "# and re-reads it on SIGUSR2.",
        f"PORT = {replica['port']}",
        f"USERS = {json.dumps(users)}",
        "# No classic clients unless asked for: that protocol is easy to fingerprint.",
        f"SECURE_ONLY = {'classic' not in modes}",
        f"TLS_ONLY = {modes == ['tls']}",
    ]
    if cell["tls_domain"]:
        lines += [
            "# Fake-TLS domain; clients that fail the handshake are proxied to it.",
            f"TLS_DOMAIN = {json.dumps(cell['tls_domain'])}",
        ]
    else:
        lines.append("MASK = False")
    if cell["ad_tag"]:
        lines.append(f"AD_TAG = {json.dumps(cell['ad_tag'])}")
    lines += [
        "# The client address comes from HAProxy's PROXY protocol header.",
        f"PROXY_PROTOCOL = {cell['client_ip'] == 'proxy_protocol'}",
        f"LISTEN_ADDR_IPV4 = {json.dumps(cell['backend_address'])}",
        'LISTEN_ADDR_IPV6 = ""',
        "STATS_PRINT_PERIOD = 60",
    ]
    if cell["handshake_timeout"]:
        lines.append(f"CLIENT_HANDSHAKE_TIMEOUT = {int(cell['handshake_timeout'])}")
    return "\n".join(lines) + "\n"


def _official_config(cell: dict, replica: dict) -> str:
    """The settings file the wrapper sources: it holds the secrets (0600)."""
    lines = [
        "# Managed by Salt (mtproxy-formula): settings of a telegrammessenger/proxy",
        "# replica, read by run-mtproto-proxy.sh. Holds the secrets: 0600, mounted read-only.",
        f"PORT={int(replica['port'])}",
        "# Local stats (127.0.0.1), read by the cell exporter.",
        f"STATS_PORT={int(replica['stats_port'])}",
        f"SECRETS={shlex.quote(' '.join(cell['secrets']))}",
        f"TAG={shlex.quote(cell['ad_tag'] or '')}",
        "# Client connections (mtproto-proxy -c); 0: the container's open-files limit",
        "# less RESERVED_FILES.",
        f"MAX_CONNECTIONS={int(cell.get('max_connections') or 0)}",
        f"RESERVED_FILES={RESERVED_FILES}",
    ]
    return "\n".join(lines) + "\n"


def _mtg_config(cell: dict, replica: dict) -> str:
    secret = "ee" + cell["secrets"][0] + cell["tls_domain"].encode().hex()
    address = cell["backend_address"]
    address = f"[{address}]" if ":" in address else address
    lines = [
        "# Managed by Salt (mtproxy-formula): mtg v2 config of one replica.",
        f'secret = "{secret}"',
        f'bind-to = "{address}:{replica["port"]}"',
        "# The client address comes from HAProxy's PROXY protocol header.",
        f"proxy-protocol-listener = {'true' if cell['client_ip'] == 'proxy_protocol' else 'false'}",
        "# Beyond this, new clients are dropped: two open files each.",
        f"concurrency = {_max_connections(cell)}",
        "",
        "# Read by the cell exporter (mtproxy/exporter).",
        "[stats.prometheus]",
        "enabled = true",
        f'bind-to = "127.0.0.1:{replica["stats_port"]}"',
        'http-path = "/metrics"',
        'metric-prefix = "mtg"',
    ]
    return "\n".join(lines) + "\n"


# -- the records -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flavor:
    """Everything the formula knows about one MTProxy implementation."""

    image: str  # the default of mtproxy:image
    mount: str  # where the container sees its config folder (read-only)
    config_name: str  # the file in it that ``renderer`` writes (0600)
    renderer: Callable[[dict, dict], str]  # (cell, replica) -> the config text
    entry_point: str
    # The container's arguments: {mount}, {config} (the config file in the
    # container), {port} and {stats_port} are filled in.
    command: str
    reload_signal: str | None  # re-reads its config on it; None: a change replaces the container
    modes: tuple[str, ...]  # client protocols it serves (tls: fake-TLS, needs tls_domain)
    client_ip: tuple[str, ...]  # how it may learn the client address (mtproxy:client_ip)
    max_secrets: int
    # Optional settings it honours: ad_tag, handshake_timeout, ipv6 (an IPv6 backend_address).
    supports: frozenset[str]
    # Open files per client connection; None: it takes no connection limit
    # (mtproxy:max_connections must be 0).
    files_per_connection: int | None
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # more files: name -> salt:// source
    capabilities: tuple[str, ...] = ()  # beyond none (cap_drop ALL)
    data: str | None = None  # a writable folder that outlives the container
    stats_path: str = "/stats"  # its local stats, http://127.0.0.1:{stats_port}{stats_path}


# What each MTProxy implementation can do: docs/measurements.md §7.
FLAVORS: dict[str, Flavor] = {
    # alexbers/mtprotoproxy, built locally (images/mtprotoproxy). Our entry
    # point (mtproxy/files) runs it and serves its per-user counters on
    # 127.0.0.1:stats_port for the cell exporter.
    "mtprotoproxy": Flavor(
        image="mtproxy-formula/mtprotoproxy:local",
        mount="/etc/mtprotoproxy",
        config_name="config.py",
        renderer=_mtprotoproxy_config,
        entry_point="python3",
        command="{mount}/stats.py {stats_port} /usr/local/bin/mtprotoproxy {config}",
        reload_signal="SIGUSR2",
        modes=MODES,
        client_ip=("tproxy", "proxy_protocol"),
        max_secrets=16,
        supports=frozenset({"ad_tag", "handshake_timeout"}),
        files_per_connection=None,
        files={"stats.py": "salt://mtproxy/files/mtprotoproxy_stats.py"},
    ),
    # telegrammessenger/proxy: the original design's image (C, upstream
    # frozen since 2019): no PROXY protocol, no fake-TLS. mtproto-proxy's
    # `-u root` calls setgroups(); Telegram's files outlive the container in /data.
    "official": Flavor(
        image="telegrammessenger/proxy:latest",
        mount="/etc/mtproxy-formula",
        config_name="settings.sh",
        renderer=_official_config,
        entry_point="/bin/sh",
        command="{mount}/run-mtproto-proxy.sh {config}",
        reload_signal=None,
        modes=("classic", "secure"),
        client_ip=("tproxy",),
        max_secrets=16,
        supports=frozenset({"ad_tag"}),
        files_per_connection=1,
        files={"run-mtproto-proxy.sh": "salt://mtproxy/files/official/run-mtproto-proxy.sh"},
        capabilities=("SETGID",),
        data="/data",
    ),
    # 9seconds/mtg v2: fake-TLS only, one secret, no ad tag by design.
    "mtg": Flavor(
        image="nineseconds/mtg:2",
        mount="/etc/mtg",
        config_name="mtg.toml",
        renderer=_mtg_config,
        entry_point="/mtg",
        command="run {config}",
        reload_signal=None,
        modes=("tls",),
        client_ip=("tproxy", "proxy_protocol"),
        max_secrets=1,
        supports=frozenset({"ipv6"}),
        files_per_connection=2,
        stats_path="/metrics",
    ),
}


def names() -> list[str]:
    """
    The flavors (pillar ``mtproxy:flavor``).

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy_flavor.names
    """
    return list(FLAVORS)


def record(name: str) -> dict[str, Any]:
    """
    The record of flavor ``name``; the renderer by its function name.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy_flavor.record official
    """
    flavor = FLAVORS[name]
    result = {field.name: getattr(flavor, field.name) for field in dataclasses.fields(flavor)}
    result.update(renderer=flavor.renderer.__name__, supports=sorted(flavor.supports))
    return result


# -- what a flavor makes of the settings ---------------------------------------------


def _limits(cell: dict) -> dict[str, Any]:
    return {**DEFAULT_LIMITS, **(cell.get("replica_limits") or {})}


def _max_connections(cell: dict) -> int:
    """Client connections a replica may hold: ``mtproxy:max_connections``, or
    what the container's open-files limit leaves (checked by :py:func:`check`)."""
    files_each = FLAVORS[cell["flavor"]].files_per_connection or 1
    return int(cell.get("max_connections") or 0) or (_limits(cell)["nofile"] - RESERVED_FILES) // files_each


def _modes(settings: dict, flavor: Flavor) -> list[str]:
    """The client protocols served: explicit, or padded plus fake-TLS when a domain is set."""
    modes = settings["modes"]
    if not modes:
        wanted = [
            mode for mode in ("secure", "tls") if mode in flavor.modes and (mode != "tls" or settings["tls_domain"])
        ]
        modes = wanted or list(flavor.modes)
    return [mode for mode in MODES if mode in modes]


def _refusals(settings: dict, name: str, flavor: Flavor) -> list[tuple[str, Any, str]]:
    """Every setting the flavor cannot honour, as (key, value shown, what is allowed), first first."""
    found = []
    client_ip, modes, tls_domain = settings["client_ip"], settings["modes"], settings["tls_domain"]
    if client_ip not in flavor.client_ip:
        takers = [other for other, record in FLAVORS.items() if client_ip in record.client_ip]
        found.append(
            (
                "client_ip",
                client_ip,
                f"flavor {name} does not accept the PROXY protocol; use tproxy, or flavor {' or '.join(takers)}",
            )
        )
    if tls_domain and "tls" not in flavor.modes:
        found.append(("tls_domain", tls_domain, f"flavor {name} has no fake-TLS; leave it empty"))
    if any(mode not in flavor.modes for mode in modes):
        found.append(("modes", modes, f"flavor {name} serves {', '.join(flavor.modes)}"))
    if "tls" in _modes(settings, flavor) and not tls_domain:
        found.append(("tls_domain", tls_domain, "mode tls (fake-TLS) needs a domain such as www.example.com"))
    if settings["handshake_timeout"] and "handshake_timeout" not in flavor.supports:
        found.append(("handshake_timeout", settings["handshake_timeout"], f"flavor {name} has no such setting; use 0"))
    if settings["ad_tag"] and "ad_tag" not in flavor.supports:
        found.append(("ad_tag", settings["ad_tag"], f"flavor {name} has no ad tag (promoted channel); leave it empty"))
    extra = settings["extra_secrets"]
    if extra and flavor.max_secrets == 1:
        found.append(("extra_secrets", HIDDEN, f"flavor {name} serves one secret per instance; leave it empty"))
    elif len(extra) + 1 > flavor.max_secrets:
        found.append(
            ("extra_secrets", f"<{len(extra)} secrets>", f"flavor {name} takes up to {flavor.max_secrets - 1} more")
        )
    found += _connection_refusals(settings, name, flavor)
    found += _address_refusals(settings, name, flavor)
    return found


def _address_refusals(settings: dict, name: str, flavor: Flavor) -> list[tuple[str, Any, str]]:
    """An IPv6 backend_address for a flavor that binds IPv4 only. (A wildcard or
    multicast address is refused for every flavor, in mtproxy.resolve.)"""
    text = settings["backend_address"]
    address = ipaddress.ip_address(text) if text else None
    if not address or address.version != 6 or address.is_unspecified or address.is_multicast:
        return []
    if "ipv6" in flavor.supports:
        return []
    return [("backend_address", text, f"flavor {name} listens on IPv4 only here; use an IPv4 address")]


def _connection_refusals(settings: dict, name: str, flavor: Flavor) -> list[tuple[str, Any, str]]:
    """A max_connections the flavor has no limit for, or that the open-files limit cannot carry."""
    wanted = int(settings.get("max_connections") or 0)
    if not wanted:
        return []
    if flavor.files_per_connection is None:
        takers = [other for other, record in FLAVORS.items() if record.files_per_connection]
        return [("max_connections", wanted, f"{name} has no connection limit; use 0 ({' and '.join(takers)} take one)")]
    nofile = _limits(settings)["nofile"]
    if wanted * flavor.files_per_connection + RESERVED_FILES > nofile:
        allowed = (
            f"a {name} replica needs {flavor.files_per_connection} open file(s) per connection plus {RESERVED_FILES},"
            f" more than mtproxy:replica_limits:nofile ({nofile}); lower it, raise nofile, or use 0 (derived from"
            " nofile)"
        )
        return [("max_connections", wanted, allowed)]
    return []


def check(settings: dict) -> dict[str, Any]:
    """
    What flavor ``mtproxy:flavor`` makes of the validated settings
    (``mtproxy_schema.validate`` calls it and raises the refusal, naming the
    key): ``refused``, the first setting the flavor cannot honour as
    ``[key, value, allowed]`` (None: none), and the ``image`` and ``modes``
    it serves when the pillar leaves them empty.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy_flavor.check "$(salt-call --out=json mtproxy.settings show_secrets=True)"
    """
    name = settings["flavor"]
    flavor = FLAVORS[name]
    refusals = _refusals(settings, name, flavor)
    return {
        "refused": list(refusals[0]) if refusals else None,
        "image": settings["image"] or flavor.image,
        "modes": _modes(settings, flavor),
    }


# -- the replica container -------------------------------------------------------------


def _container_options(cell: dict, replica: dict, flavor: Flavor) -> dict[str, Any]:
    """Hardening and limits of a replica container (docker_container.running
    arguments): like HAProxy's, no capability beyond what the flavor needs."""
    limits = _limits(cell)
    capabilities = list(flavor.capabilities)
    if replica["port"] < 1024:
        capabilities.append("NET_BIND_SERVICE")
    nofile = int(limits["nofile"])
    options: dict[str, Any] = {
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": int(limits["pids"]),
        "mem_limit": int(limits["memory"]),
        # Set, not inherited from dockerd: mtproto-proxy sizes -c from it.
        "ulimits": [f"nofile={nofile}:{nofile}"],
        "read_only": bool(limits["read_only"]),
    }
    if capabilities:
        options["cap_add"] = capabilities
    return options


def replica(cell: dict, replica: dict) -> dict[str, Any]:
    """
    How to run one replica of ``cell`` (the settings from ``mtproxy.settings``):
    ``image``, ``entrypoint``, ``command``, ``environment``, ``binds``,
    ``labels``, ``config_file`` and its ``config`` text, more ``files`` for
    its config folder (name -> salt:// source), ``reload_signal`` (None: a
    config change replaces the container) and ``container_options``.

    Called by mtproxy/replicas.sls; on the command line use :py:func:`show`.
    """
    flavor = FLAVORS[cell["flavor"]]
    config_dir = replica["config_dir"]
    config = flavor.renderer(cell, replica)
    binds = [f"{config_dir}:{flavor.mount}:ro"]
    if flavor.data:
        # The root is read-only; what the replica keeps outlives the container here.
        binds.append(f"{config_dir}/data:{flavor.data}:rw")
    labels = ["mtproxy-formula.role=replica", f"mtproxy-formula.flavor={cell['flavor']}"]
    if flavor.reload_signal is None:
        labels.append("mtproxy-formula.config=" + hashlib.sha256(config.encode()).hexdigest()[:16])
    command = flavor.command.format(
        mount=flavor.mount,
        config=f"{flavor.mount}/{flavor.config_name}",
        port=replica["port"],
        stats_port=replica["stats_port"],
    )
    return {
        "image": cell["image"] or flavor.image,
        "entrypoint": flavor.entry_point,
        "command": command,
        "environment": dict(cell["replica_environment"]),
        "binds": binds,
        "labels": labels,
        "config_file": f"{config_dir}/{flavor.config_name}",
        "config": config,
        "files": dict(flavor.files),
        "reload_signal": flavor.reload_signal,
        "container_options": _container_options(cell, replica, flavor),
    }


def show(index: int = 1) -> dict[str, Any]:
    """
    The container spec of replica ``index`` of this host's cell, with the
    secrets masked (they are in its config or environment).

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy_flavor.show 2
    """
    # The real secrets: the spec is rendered from them (a config digest label
    # depends on them), then they are masked.
    cell = __salt__["mtproxy.settings"](show_secrets=True)
    replicas = {item["index"]: item for item in cell["replica_list"]}
    if int(index) not in replicas:
        raise CommandExecutionError(f"no replica {index}: the cell has {len(replicas)}")
    spec = replica(cell, replicas[int(index)])
    return json.loads(__salt__["mtproxy.mask"](json.dumps(spec), cell["secrets"]))
