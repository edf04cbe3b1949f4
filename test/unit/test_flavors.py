"""Each flavor and client-IP mode, rendered: the replica container spec
(mtproxy_flavor.replica), its config file as the replica parses it, the
HAProxy server lines, and the client links of every secret form.

Pure rendering: the end-to-end proof of the PROXY-protocol mode is
test/integration/test_proxy_protocol.py, with real containers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tomllib
import urllib.parse
from pathlib import Path

import jinja2
import pytest
from test_settings import (  # noqa: F401 (loader mocks, autouse fixture)
    SECRET,
    configure_loader_modules,
    flavors,
    loader_stubs,
    mtproxy,
    schema,
    settings,
)

REPO = Path(__file__).resolve().parents[2]

SECOND = "8e1f5f0c2b7e9a1d4c3b6f0a2d4c6b8e"
AD_TAG = "3c09c680b76ee91a4c25ad51f742267d"
DOMAIN = "www.example.com"
# The default HAProxy template (mtproxy/files/default/, where the TOFS lookup ends).
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(REPO / "mtproxy" / "files" / "default"))


def cell(**changes) -> dict:
    haproxy = changes.pop("haproxy", {})
    resolved = settings(secret=SECRET, **changes)
    resolved["haproxy"] = {**resolved["haproxy"], **haproxy}
    return mtproxy.resolve(resolved)


def replica_spec(resolved: dict, index: int = 0) -> dict:
    return flavors.replica(resolved, resolved["replica_list"][index])


def haproxy_backend(resolved: dict) -> list[str]:
    """The rendered backend section, one stripped line each."""
    text = TEMPLATES.get_template("haproxy.cfg.jinja").render(mtproxy=resolved)
    section = text.split(f"backend {resolved['haproxy']['backend']}\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in section.splitlines() if line.strip() and not line.strip().startswith("#")]


def python_config(text: str) -> dict:
    namespace: dict = {}
    exec(compile(text, "config.py", "exec"), namespace)  # how mtprotoproxy reads it
    return {key: value for key, value in namespace.items() if key.isupper()}


def test_mtprotoproxy_with_tproxy_reloads_its_config_file():
    resolved = cell(extra_secrets=[SECOND], ad_tag=AD_TAG, tls_domain=DOMAIN, handshake_timeout=30)
    spec = replica_spec(resolved)
    assert spec["image"] == "mtproxy-formula/mtprotoproxy:local"
    # Our entry point runs mtprotoproxy and serves its counters on port+10000.
    assert spec["entrypoint"] == "python3"
    assert spec["command"] == "/etc/mtprotoproxy/stats.py 14431 /usr/local/bin/mtprotoproxy /etc/mtprotoproxy/config.py"
    assert spec["files"] == {"stats.py": "salt://mtproxy/files/mtprotoproxy_stats.py"}
    assert spec["binds"] == [f"{resolved['config_dir']}/replicas/mtproxy_1:/etc/mtprotoproxy:ro"]
    assert spec["config_file"].endswith("/replicas/mtproxy_1/config.py")
    assert spec["reload_signal"] == "SIGUSR2"
    # A reloadable config needs no digest label: a change is a signal, not a new container.
    assert not any(label.startswith("mtproxy-formula.config=") for label in spec["labels"])
    config = python_config(spec["config"])
    assert config["PORT"] == 4431 and config["USERS"] == {"tg": SECRET, "tg2": SECOND}
    assert config["SECURE_ONLY"] is True and config["TLS_ONLY"] is False
    assert config["TLS_DOMAIN"] == DOMAIN and config["AD_TAG"] == AD_TAG
    assert config["PROXY_PROTOCOL"] is False and config["CLIENT_HANDSHAKE_TIMEOUT"] == 30
    assert config["LISTEN_ADDR_IPV4"] == "203.0.113.10"
    backend = haproxy_backend(resolved)
    assert "source 0.0.0.0 usesrc clientip" in backend
    assert not any("send-proxy" in line for line in backend)
    assert "server mtproxy_2 203.0.113.10:4432" in backend


def test_mtprotoproxy_with_proxy_protocol_sends_the_header_on_traffic_and_checks():
    resolved = cell(client_ip="proxy_protocol")
    config = python_config(replica_spec(resolved)["config"])
    assert config["PROXY_PROTOCOL"] is True
    backend = haproxy_backend(resolved)
    assert not any("usesrc" in line for line in backend)
    default_server = next(line for line in backend if line.startswith("default-server"))
    assert default_server.endswith(" send-proxy-v2 check-send-proxy")
    assert default_server.startswith("default-server check inter 1s")


@pytest.mark.parametrize(
    ("modes", "secure_only", "tls_only"),
    [(["secure"], True, False), (["tls"], True, True), (["classic", "secure", "tls"], False, False)],
)
def test_mtprotoproxy_modes(modes, secure_only, tls_only):
    config = python_config(replica_spec(cell(modes=modes, tls_domain=DOMAIN))["config"])
    assert (config["SECURE_ONLY"], config["TLS_ONLY"]) == (secure_only, tls_only)


@pytest.mark.parametrize("client_ip", ["tproxy", "proxy_protocol"])
def test_mtg_gets_a_toml_file_with_its_fake_tls_secret(client_ip):
    resolved = cell(flavor="mtg", tls_domain=DOMAIN, client_ip=client_ip)
    assert resolved["modes"] == ["tls"]
    spec = replica_spec(resolved, 1)
    assert spec["image"] == "nineseconds/mtg:2"
    assert spec["entrypoint"] == "/mtg" and spec["command"] == "run /etc/mtg/mtg.toml"
    assert spec["binds"] == [f"{resolved['config_dir']}/replicas/mtproxy_2:/etc/mtg:ro"]
    assert spec["reload_signal"] is None
    config = tomllib.loads(spec["config"])
    assert config == {
        "secret": "ee" + SECRET + DOMAIN.encode().hex(),
        # With the PROXY protocol only HAProxy on the host may reach a replica.
        "bind-to": ("203.0.113.10" if client_ip == "tproxy" else "127.0.0.1") + ":4432",
        "proxy-protocol-listener": client_ip == "proxy_protocol",
        "concurrency": (16384 - 64) // 2,
        # Its Prometheus endpoint on loopback, read by the cell exporter.
        "stats": {
            "prometheus": {
                "enabled": True,
                "bind-to": "127.0.0.1:14432",
                "http-path": "/metrics",
                "metric-prefix": "mtg",
            }
        },
    }
    backend = haproxy_backend(resolved)
    assert ("source 0.0.0.0 usesrc clientip" in backend) == (client_ip == "tproxy")


def test_a_flavor_that_cannot_reload_is_replaced_when_its_config_changes():
    first = replica_spec(cell(flavor="mtg", tls_domain=DOMAIN))
    again = replica_spec(cell(flavor="mtg", tls_domain=DOMAIN))
    changed = replica_spec(cell(flavor="mtg", tls_domain="cdn.example.org"))
    digest = [label for label in first["labels"] if label.startswith("mtproxy-formula.config=")]
    assert len(digest) == 1
    assert first["labels"] == again["labels"]
    assert digest[0] not in changed["labels"]


def test_official_runs_the_wrapper_with_its_settings_file():
    resolved = cell(flavor="official", extra_secrets=[SECOND], ad_tag=AD_TAG, replica_environment={"WORKERS": 4})
    assert resolved["modes"] == ["secure"]
    spec = replica_spec(resolved, 1)
    assert spec["image"] == "telegrammessenger/proxy:latest"
    assert spec["entrypoint"] == "/bin/sh"
    assert spec["command"] == "/etc/mtproxy-formula/run-mtproto-proxy.sh /etc/mtproxy-formula/settings.sh"
    # The wrapper is a file of the formula, delivered beside the settings file.
    assert spec["files"] == {"run-mtproto-proxy.sh": "salt://mtproxy/files/official/run-mtproto-proxy.sh"}
    # No secret, no tag and no port in the environment: only the pillar's.
    assert spec["environment"] == {"WORKERS": "4"}
    replica_dir = f"{resolved['config_dir']}/replicas/mtproxy_2"
    assert spec["config_file"] == f"{replica_dir}/settings.sh"
    assert spec["binds"] == [f"{replica_dir}:/etc/mtproxy-formula:ro", f"{replica_dir}/data:/data:rw"]
    assert any(label.startswith("mtproxy-formula.config=") for label in spec["labels"])
    assert "source 0.0.0.0 usesrc clientip" in haproxy_backend(resolved)


def salt_file(source: str) -> Path:
    """The file of the formula a salt:// source names (file_roots is the repository)."""
    path = REPO / source.removeprefix("salt://")
    assert path.is_file(), source
    return path


def run_wrapper(tmp_path, spec: dict, nofile: int) -> subprocess.CompletedProcess:
    """The replica's entry point as the container would run it: the formula's
    wrapper file (the spec's ``files``) with the rendered settings file,
    under ``ulimit -n nofile``. Its data folder is moved to tmp_path, and curl
    and mtproto-proxy are stubs; the mtproto-proxy stub records its argv (in
    ``args``) and the wrapper's own (``args.parent``, from /proc)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "curl").write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\necho data > "$2"\n')
    (tmp_path / "bin" / "mtproto-proxy").write_text(
        '#!/bin/sh\necho "$@" > "$ARGS"\ntr "\\0" " " < /proc/$PPID/cmdline > "$ARGS.parent"\n'
    )
    for stub in (tmp_path / "bin").iterdir():
        stub.chmod(0o755)
    mount = flavors.FLAVORS["official"].mount
    for name, source in spec["files"].items():
        text = salt_file(source).read_text()
        # Not exec: the stub reads the wrapper's command line as its parent's.
        for old, new in (("data=/data", f"data={tmp_path}/data"), ("exec /usr/local/bin/", f"{tmp_path}/bin/")):
            assert text.count(old) == 1, f"{source} no longer has {old!r}"
            text = text.replace(old, new)
        (tmp_path / name).write_text(text)
    (tmp_path / Path(spec["config_file"]).name).write_text(spec["config"])
    entry_point, *args = spec["command"].replace(mount, str(tmp_path)).split()
    return subprocess.run(
        ["sh", "-c", f'ulimit -n {nofile} && exec {spec["entrypoint"]} "$@"', "sh", entry_point, *args],
        env={**spec["environment"], "PATH": f"{tmp_path}/bin:/usr/bin:/bin", "ARGS": str(tmp_path / "args")},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_official_wrapper_passes_port_secrets_and_tag_to_mtproto_proxy(tmp_path):
    spec = replica_spec(cell(flavor="official", extra_secrets=[SECOND], ad_tag=AD_TAG))
    run = run_wrapper(tmp_path, spec, nofile=4096)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-H") + 1] == "4431" and args[args.index("-p") + 1] == "14431"
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "-S"] == [SECRET, SECOND]
    assert args[args.index("-P") + 1] == AD_TAG and args[args.index("-M") + 1] == "1"
    assert args[-1] == f"{tmp_path}/data/proxy-multi.conf"
    assert os.path.getsize(tmp_path / "data" / "proxy-secret") > 0
    # The wrapper's own command line (what ps shows for it) names its files only.
    wrapper_argv = (tmp_path / "args.parent").read_text()
    assert wrapper_argv.split() == ["/bin/sh", str(tmp_path / "run-mtproto-proxy.sh"), str(tmp_path / "settings.sh")]
    # No secret in the environment it was given either.
    assert SECRET not in json.dumps(spec["environment"]) and AD_TAG not in json.dumps(spec["environment"])


@pytest.mark.parametrize(("nofile", "connections"), [(1024, 960), (16384, 16320), (20000, 19936)])
def test_official_wrapper_sizes_max_connections_from_the_open_files_limit(tmp_path, nofile, connections):
    """mtproto-proxy's default -c 65536 needs 65552 open files ("cannot raise open
    file limit"): the wrapper leaves it a margin below the limit it really has."""
    run = run_wrapper(tmp_path, replica_spec(cell(flavor="official")), nofile=nofile)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text().split()
    assert int(args[args.index("-c") + 1]) == connections
    assert connections + 16 <= nofile


def test_official_wrapper_takes_max_connections_from_the_pillar(tmp_path):
    spec = replica_spec(cell(flavor="official", max_connections=5000))
    run = run_wrapper(tmp_path, spec, nofile=16384)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-c") + 1] == "5000"
    # Under a lower limit than the pillar planned for, a clear error, not mtproto-proxy's.
    run = run_wrapper(tmp_path, spec, nofile=1024)
    assert run.returncode == 1
    assert "max connections 5000 need 5064 open files; the container's limit is 1024" in run.stderr
    assert "mtproxy:replica_limits:nofile" in run.stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"flavor": "official", "max_connections": 16384}, "a official replica needs 1 open file(s)"),
        ({"flavor": "mtg", "tls_domain": DOMAIN, "max_connections": 9000}, "a mtg replica needs 2 open file(s)"),
        ({"max_connections": 100}, "mtprotoproxy has no connection limit"),
    ],
    ids=["official-above-nofile", "mtg-above-nofile", "mtprotoproxy-has-none"],
)
def test_a_max_connections_the_limit_cannot_carry_is_refused(changes, message):
    with pytest.raises(mtproxy.SettingsError, match="Pillar mtproxy:max_connections is") as error:
        cell(**changes)
    assert message in str(error.value)


def test_mtg_concurrency_follows_the_open_files_limit():
    derived = tomllib.loads(replica_spec(cell(flavor="mtg", tls_domain=DOMAIN))["config"])
    assert derived["concurrency"] == (16384 - 64) // 2
    chosen = tomllib.loads(replica_spec(cell(flavor="mtg", tls_domain=DOMAIN, max_connections=3000))["config"])
    assert chosen["concurrency"] == 3000


def test_the_wrapper_refuses_to_run_without_its_settings_file(tmp_path):
    spec = replica_spec(cell(flavor="official"))
    wrapper = salt_file(spec["files"]["run-mtproto-proxy.sh"])
    run = subprocess.run(["sh", str(wrapper), str(tmp_path / "absent")], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "usage:" in run.stderr


# -- the records ----------------------------------------------------------------------


def test_every_record_names_files_that_exist_and_a_default_image_the_schema_fills_in():
    for name in flavors.names():
        record = flavors.record(name)
        for source in record["files"].values():
            salt_file(source)
        assert record["modes"] and set(record["modes"]) <= set(flavors.MODES)
        assert "tproxy" in record["client_ip"]
        json.dumps(record)  # what salt-call prints
    assert cell(image="")["image"] == flavors.FLAVORS["mtprotoproxy"].image


def test_adding_a_flavor_is_adding_a_record(monkeypatch):
    """A new flavor in FLAVORS alone: the schema accepts its name, refuses what
    its record does not support, fills in its image and modes, and the
    replica spec follows the record."""
    record = dataclasses.replace(
        flavors.FLAVORS["mtg"],
        image="example/teleproxy:1",
        mount="/etc/teleproxy",
        config_name="teleproxy.toml",
        modes=("secure", "tls"),
        client_ip=("tproxy",),
        supports=frozenset({"ad_tag"}),
        reload_signal="SIGHUP",
    )
    monkeypatch.setitem(flavors.FLAVORS, "teleproxy", record)
    validated = schema.validate(settings(secret=SECRET, flavor="teleproxy", tls_domain=DOMAIN, ad_tag=AD_TAG))
    assert validated["image"] == "example/teleproxy:1" and validated["modes"] == ["secure", "tls"]
    for changes, key in (
        ({"client_ip": "proxy_protocol"}, "client_ip"),
        ({"modes": ["classic"]}, "modes"),
        ({"handshake_timeout": 30}, "handshake_timeout"),
        ({"extra_secrets": [SECOND]}, "extra_secrets"),
    ):
        with pytest.raises(mtproxy.SettingsError, match=f"^Pillar mtproxy:{key} is .*flavor teleproxy"):
            schema.validate(settings(secret=SECRET, flavor="teleproxy", tls_domain=DOMAIN, **changes))
    resolved = cell(flavor="mtg", tls_domain=DOMAIN) | {"flavor": "teleproxy", "image": validated["image"]}
    spec = replica_spec(resolved)
    assert spec["image"] == "example/teleproxy:1" and spec["command"] == "run /etc/teleproxy/teleproxy.toml"
    assert spec["binds"][0].endswith(":/etc/teleproxy:ro") and spec["config_file"].endswith("/teleproxy.toml")
    assert spec["reload_signal"] == "SIGHUP"
    # A flavor that reloads needs no config digest: a change is a signal.
    assert not any(label.startswith("mtproxy-formula.config=") for label in spec["labels"])


FLAVORS = [
    {"flavor": "mtprotoproxy", "extra_secrets": [SECOND], "ad_tag": AD_TAG, "tls_domain": DOMAIN},
    {"flavor": "official", "extra_secrets": [SECOND], "ad_tag": AD_TAG},
    {"flavor": "mtg", "tls_domain": DOMAIN},
]


@pytest.mark.parametrize("changes", FLAVORS, ids=[f["flavor"] for f in FLAVORS])
def test_every_flavor_runs_hardened_like_haproxy(changes):
    spec = replica_spec(cell(**changes))
    options = spec["container_options"]
    assert options["cap_drop"] == ["ALL"] and options["security_opt"] == ["no-new-privileges"]
    assert options.get("cap_add", []) == {"official": ["SETGID"]}.get(changes["flavor"], [])
    assert options["pids_limit"] == 512 and options["mem_limit"] == 512 * 1024 * 1024
    assert options["ulimits"] == ["nofile=16384:16384"]
    assert options["read_only"] is True


def test_limits_come_from_the_pillar_and_low_ports_get_their_capability():
    limits = {"pids": 100, "memory": 64 * 1024 * 1024, "nofile": 4096, "read_only": False}
    resolved = cell(base_port=443)
    resolved["replica_limits"] = limits
    options = replica_spec(resolved)["container_options"]
    assert options["pids_limit"] == 100 and options["mem_limit"] == 64 * 1024 * 1024
    assert options["ulimits"] == ["nofile=4096:4096"] and options["read_only"] is False
    assert options["cap_add"] == ["NET_BIND_SERVICE"]


@pytest.mark.parametrize("changes", FLAVORS, ids=[f["flavor"] for f in FLAVORS])
def test_no_secret_outside_the_config_text(changes):
    """The config file is written 0600 without a diff; everything else of the
    spec reaches docker inspect or the state output."""
    resolved = cell(**changes)
    spec = replica_spec(resolved)
    visible = {key: value for key, value in spec.items() if key != "config"}
    for secret in resolved["secrets"]:
        assert secret not in repr(visible)
        # Not even the forms clients use (dd..., ee...) or an upper-case copy.
        assert secret.upper() not in repr(visible).upper()


def test_links_follow_the_client_formats_for_every_secret_and_mode():
    resolved = cell(extra_secrets=[SECOND], modes=["classic", "secure", "tls"], tls_domain=DOMAIN)
    links = mtproxy.build_links("proxy.example.net", 8443, resolved["secrets"], resolved["modes"], DOMAIN)
    expected = {
        (0, "classic"): SECRET,
        (0, "secure"): "dd" + SECRET,
        (0, "tls"): "ee" + SECRET + DOMAIN.encode().hex(),
        (1, "classic"): SECOND,
        (1, "secure"): "dd" + SECOND,
        (1, "tls"): "ee" + SECOND + DOMAIN.encode().hex(),
    }
    assert {(link["secret"], link["mode"]): link for link in links}.keys() == expected.keys()
    for link in links:
        for key, scheme in (("tg", "tg://proxy?"), ("https", "https://t.me/proxy?")):
            assert link[key].startswith(scheme)
            query = urllib.parse.parse_qs(link[key].split("?", 1)[1])
            assert query == {
                "server": ["proxy.example.net"],
                "port": ["8443"],
                "secret": [expected[link["secret"], link["mode"]]],
            }
    masked = mtproxy.mask(" ".join(link["tg"] for link in links), resolved["secrets"])
    assert SECRET not in masked and SECOND not in masked


def test_mtg_links_are_fake_tls_only():
    resolved = cell(flavor="mtg", tls_domain=DOMAIN)
    links = mtproxy.build_links("h", 1, resolved["secrets"], resolved["modes"], DOMAIN)
    assert [link["mode"] for link in links] == ["tls"]
