"""
Replica container specs of an MTProxy cell, one per implementation ("flavor").

``mtproxy/replicas.sls`` asks :py:func:`replica` how to run each replica:
image, entry point, command, environment, the config file it reads (text
rendered here) and how a config change reaches it. The settings come from
``mtproxy.resolve``, which has already refused what a flavor cannot do.

- ``mtprotoproxy``: a Python config file; re-read on SIGUSR2, so a config
  change never restarts the replica.
- ``official`` (``telegrammessenger/proxy``): SECRET, TAG and WORKERS in the
  environment, run by our wrapper (``run.sh``) that takes the port from PORT
  like the original design's did.
- ``mtg`` (v2): a TOML file.

The last two cannot reload: their config's digest is a container label, so a
change replaces the container through the same drain as an image change.

CLI example (what replica 1 runs, secrets masked):

.. code-block:: bash

    salt '*' mtproxy_flavor.show 1
"""

from __future__ import annotations

import hashlib
import json
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

OFFICIAL_WRAPPER = """\
#!/bin/sh
# Managed by Salt (mtproxy-formula): entry point of a telegrammessenger/proxy
# replica. Like the original design's run.sh it listens on $PORT, so several
# replicas share the host network. SECRET (comma-separated), TAG and WORKERS
# as in the image's own run.sh; STATS_PORT: local stats; NAT_INFO
# (<local address>:<public address>): needed behind NAT.
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
set -- -u root -p "$STATS_PORT" -H "$PORT" -M "${WORKERS:-1}" -C 60000 \\
    --aes-pwd "$data/proxy-secret" --allow-skip-dh
for secret in $(echo "$SECRET" | tr ',' ' '); do
    set -- "$@" -S "$secret"
done
if [ -n "${TAG:-}" ]; then set -- "$@" -P "$TAG"; fi
if [ -n "${NAT_INFO:-}" ]; then set -- "$@" --nat-info "$NAT_INFO"; fi
exec /usr/local/bin/mtproto-proxy "$@" "$data/proxy-multi.conf"
"""


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
    if flavor == "mtprotoproxy":
        config = _mtprotoproxy_config(cell, replica)
        command = config_file
        reload_signal = "SIGUSR2"
    elif flavor == "official":
        config = OFFICIAL_WRAPPER
        entrypoint = "/bin/sh"
        command = config_file
        environment = {"WORKERS": "1", **environment}
        environment.update(
            {
                "SECRET": ",".join(cell["secrets"]),
                "PORT": str(replica["port"]),
                "STATS_PORT": str(replica["stats_port"]),
            }
        )
        if cell["ad_tag"]:
            environment["TAG"] = cell["ad_tag"]
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
        "binds": [f"{replica['config_dir']}:{mount}:ro"],
        "labels": labels,
        "config_file": f"{replica['config_dir']}/{CONFIG_NAMES[flavor]}",
        "config": config,
        "reload_signal": reload_signal,
        # More docker_container.running arguments (hardening, limits).
        "container_options": {},
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
