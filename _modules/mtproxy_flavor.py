"""
Replica container specs of an MTProxy cell, one per implementation ("flavor").

``mtproxy/replicas.sls`` asks :py:func:`replica` how to run each replica:
image, entry point, command, environment, the config file it reads (text
rendered here) and how a config change reaches it. The settings come from
``mtproxy.resolve``, which has already refused what a flavor cannot do.

- ``mtprotoproxy``: a Python config file; re-read on SIGUSR2, so a config
  change never restarts the replica.
- ``official`` (``telegrammessenger/proxy``): our wrapper (``run.sh``), which
  takes the port from PORT like the original design's did. The secrets and
  the ad tag are in the wrapper file itself (0600), never in the environment.
- ``mtg`` (v2): a TOML file.

The last two cannot reload: their config's digest is a container label, so a
change replaces the container through the same drain as an image change.

Every flavor runs hardened like HAProxy (``container_options``): no
capabilities but the few it needs, ``no-new-privileges``, pids, memory and
open-files limits from ``mtproxy:replica_limits``, and a read-only root.

CLI example (what replica 1 runs, secrets masked):

.. code-block:: bash

    salt '*' mtproxy_flavor.show 1
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

try:
    from salt.exceptions import CommandExecutionError
except ImportError:  # imported without Salt, e.g. by unit tests of pure logic

    class CommandExecutionError(Exception):  # type: ignore[no-redef]
        pass


__virtualname__ = "mtproxy_flavor"

# Where the replica container sees its config folder (mounted read-only).
MOUNTS = {"mtprotoproxy": "/etc/mtprotoproxy", "official": "/etc/mtproxy-formula", "mtg": "/etc/mtg"}
CONFIG_NAMES = {"mtprotoproxy": "config.py", "official": "run.sh", "mtg": "mtg.toml"}

# replica_limits until the schema fills them in (pillar mtproxy:replica_limits).
DEFAULT_LIMITS = {"pids": 512, "memory": 512 * 1024 * 1024, "nofile": 16384, "read_only": True}
# Open files a replica keeps for itself (listening and stats sockets, epoll,
# its files, connections to Telegram) on top of its client connections;
# mtproto-proxy alone wants 16 more than its -c.
RESERVED_FILES = 64
# What each flavor needs beyond nothing: mtproto-proxy's `-u root` calls
# setgroups(). mtprotoproxy and mtg need none (measured for mtprotoproxy).
CAPABILITIES = {"mtprotoproxy": [], "official": ["SETGID"], "mtg": []}
# The mtprotoproxy replicas' entry point (mtproxy/files), in their config folder.
STATS_HOOK = "stats.py"
STATS_HOOK_SOURCE = "salt://mtproxy/files/mtprotoproxy_stats.py"
MTPROTOPROXY = "/usr/local/bin/mtprotoproxy"
# Where the official wrapper keeps Telegram's proxy secret and DC list.
OFFICIAL_DATA = "/data"

OFFICIAL_WRAPPER = """\
# Like the original design's run.sh it listens on $PORT, so several replicas
# share the host network. WORKERS as in the image's own run.sh; STATS_PORT:
# local stats; NAT_INFO (<local address>:<public address>): needed behind NAT.
# SECRETS, TAG and MAX_CONNECTIONS are set above, in this 0600 file: never in
# the environment (docker inspect shows that).
set -eu
data=/data
mkdir -p "$data"
# Telegram's proxy secret and data-centre list, fetched at each start as the
# image's run.sh does; the last good copy is kept for when that fails.
for item in getProxySecret:proxy-secret getProxyConfig:proxy-multi.conf; do
    url="https://core.telegram.org/${item%%:*}" file="$data/${item#*:}"
    if curl -fsS --max-time 20 "$url" -o "$file.new"; then
        mv "$file.new" "$file"
    elif [ ! -s "$file" ]; then
        echo "cannot fetch $url and no earlier copy" >&2
        exit 1
    fi
done
# mtproto-proxy needs -c + 16 open files and, without CAP_SYS_RESOURCE, cannot
# raise the container's limit: size -c from that limit.
limit=$(ulimit -n)
if [ "$limit" = unlimited ]; then limit=65600; fi
connections=${MAX_CONNECTIONS:-0}
if [ "$connections" -eq 0 ]; then connections=$((limit - RESERVED_FILES)); fi
if [ "$connections" -lt 1 ] || [ $((connections + RESERVED_FILES)) -gt "$limit" ]; then
    echo "max connections $connections need $((connections + RESERVED_FILES)) open files;" \\
        "the container's limit is $limit (pillar mtproxy:replica_limits:nofile)" >&2
    exit 1
fi
set -- -u root -p "$STATS_PORT" -H "$PORT" -M "${WORKERS:-1}" -C 60000 \\
    -c "$connections" --aes-pwd "$data/proxy-secret" --allow-skip-dh
# mtproto-proxy takes secrets only as -S arguments (no file, no environment
# variable): they are on its command line, not on this wrapper's.
for secret in $SECRETS; do
    set -- "$@" -S "$secret"
done
if [ -n "$TAG" ]; then set -- "$@" -P "$TAG"; fi
if [ -n "${NAT_INFO:-}" ]; then set -- "$@" --nat-info "$NAT_INFO"; fi
exec /usr/local/bin/mtproto-proxy "$@" "$data/proxy-multi.conf"
""".replace("RESERVED_FILES", str(RESERVED_FILES))


def __virtual__():
    return __virtualname__


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


def _limits(cell: dict) -> dict[str, Any]:
    return {**DEFAULT_LIMITS, **(cell.get("replica_limits") or {})}


def _max_connections(cell: dict, files_each: int) -> int:
    """Client connections a replica may hold: ``mtproxy:max_connections``, or
    what the container's open-files limit leaves when each takes ``files_each``
    descriptors. A value the limit cannot carry is refused here, at render."""
    nofile = _limits(cell)["nofile"]
    wanted = int(cell.get("max_connections") or 0)
    if not wanted:
        return (nofile - RESERVED_FILES) // files_each
    if wanted * files_each + RESERVED_FILES > nofile:
        raise CommandExecutionError(
            f"Pillar mtproxy:max_connections is {wanted}: a {cell['flavor']} replica needs"
            f" {files_each} open file(s) per connection plus {RESERVED_FILES}, more than"
            f" mtproxy:replica_limits:nofile ({nofile}); lower it, raise nofile, or use 0"
            " (derived from nofile)"
        )
    return wanted


def _official_config(cell: dict) -> str:
    """The wrapper, headed by its settings: the secrets live in this 0600 file."""
    header = [
        "#!/bin/sh",
        "# Managed by Salt (mtproxy-formula): entry point of a telegrammessenger/proxy",
        "# replica. This file holds the secrets: 0600, mounted read-only.",
        f"SECRETS={shlex.quote(' '.join(cell['secrets']))}",
        f"TAG={shlex.quote(cell['ad_tag'] or '')}",
        "# Client connections (mtproto-proxy -c); 0: the container's open-files limit",
        f"# less {RESERVED_FILES}.",
        f"MAX_CONNECTIONS={int(cell.get('max_connections') or 0)}",
    ]
    return "\n".join(header) + "\n" + OFFICIAL_WRAPPER


def _container_options(cell: dict, replica: dict) -> dict[str, Any]:
    """Hardening and limits of a replica container (docker_container.running
    arguments): like HAProxy's, no capability beyond what the flavor needs."""
    flavor = cell["flavor"]
    limits = _limits(cell)
    capabilities = list(CAPABILITIES[flavor])
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


def _mtg_config(cell: dict, replica: dict) -> str:
    secret = "ee" + cell["secrets"][0] + cell["tls_domain"].encode().hex()
    address = cell["backend_address"]
    address = f"[{address}]" if ":" in address else address
    return (
        "\n".join(
            [
                "# Managed by Salt (mtproxy-formula): mtg v2 config of one replica.",
                f'secret = "{secret}"',
                f'bind-to = "{address}:{replica["port"]}"',
                "# The client address comes from HAProxy's PROXY protocol header.",
                f"proxy-protocol-listener = {'true' if cell['client_ip'] == 'proxy_protocol' else 'false'}",
                "# Beyond this, new clients are dropped: two open files each.",
                f"concurrency = {_max_connections(cell, 2)}",
                "",
                "# Read by the cell exporter (mtproxy/exporter).",
                "[stats.prometheus]",
                "enabled = true",
                f'bind-to = "127.0.0.1:{replica["stats_port"]}"',
                'http-path = "/metrics"',
                'metric-prefix = "mtg"',
            ]
        )
        + "\n"
    )


def replica(cell: dict, replica: dict) -> dict[str, Any]:
    """
    How to run one replica of ``cell`` (the settings from ``mtproxy.settings``):
    ``image``, ``entrypoint`` (None: the image's), ``command``,
    ``environment``, ``binds``, ``labels``, ``config_file`` and its
    ``config`` text, and ``reload_signal`` (None: a config change replaces
    the container).

    Called by mtproxy/replicas.sls; on the command line use :py:func:`show`.
    """
    flavor = cell["flavor"]
    mount = MOUNTS[flavor]
    config_file = f"{mount}/{CONFIG_NAMES[flavor]}"
    environment = dict(cell["replica_environment"])
    entrypoint = None
    reload_signal = None
    binds = [f"{replica['config_dir']}:{mount}:ro"]
    files: dict[str, str] = {}
    if flavor == "mtprotoproxy":
        if cell.get("max_connections"):
            raise CommandExecutionError(
                f"Pillar mtproxy:max_connections is {cell['max_connections']}: mtprotoproxy has no"
                " connection limit; use 0 (official and mtg take one)"
            )
        config = _mtprotoproxy_config(cell, replica)
        # Our entry point runs mtprotoproxy and serves its per-user counters
        # on 127.0.0.1:stats_port for the cell exporter (mtproxy/exporter).
        entrypoint = "python3"
        command = f"{mount}/{STATS_HOOK} {replica['stats_port']} {MTPROTOPROXY} {config_file}"
        files[STATS_HOOK] = STATS_HOOK_SOURCE
        reload_signal = "SIGUSR2"
    elif flavor == "official":
        _max_connections(cell, 1)
        config = _official_config(cell)
        entrypoint = "/bin/sh"
        command = config_file
        environment = {"WORKERS": "1", **environment}
        environment.update({"PORT": str(replica["port"]), "STATS_PORT": str(replica["stats_port"])})
        # The root is read-only; Telegram's files outlive the container here.
        binds.append(f"{replica['config_dir']}/data:{OFFICIAL_DATA}:rw")
    else:
        config = _mtg_config(cell, replica)
        entrypoint = "/mtg"
        command = f"run {config_file}"
    labels = ["mtproxy-formula.role=replica", f"mtproxy-formula.flavor={flavor}"]
    if reload_signal is None:
        labels.append("mtproxy-formula.config=" + hashlib.sha256(config.encode()).hexdigest()[:16])
    return {
        "image": cell["image"],
        "entrypoint": entrypoint,
        "command": command,
        "environment": environment,
        "binds": binds,
        "labels": labels,
        "config_file": f"{replica['config_dir']}/{CONFIG_NAMES[flavor]}",
        "config": config,
        # More files for its config folder (name -> salt:// source).
        "files": files,
        "reload_signal": reload_signal,
        # More docker_container.running arguments (hardening, limits).
        "container_options": _container_options(cell, replica),
    }


def show(index: int = 1) -> dict[str, Any]:
    """
    The container spec of replica ``index`` of this host's cell, with the
    secrets masked (they are in its config or environment).

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy_flavor.show 2
    """
    cell = __salt__["mtproxy.settings"]()
    replicas = {item["index"]: item for item in cell["replica_list"]}
    if int(index) not in replicas:
        raise CommandExecutionError(f"no replica {index}: the cell has {len(replicas)}")
    spec = replica(cell, replicas[int(index)])
    masked = json.loads(__salt__["mtproxy.mask"](json.dumps(spec), cell["secrets"]))
    return masked
