"""Each flavor and client-IP mode, rendered: the replica container spec
(mtproxy_flavor.replica), its config file as the replica parses it, the
HAProxy server lines, and the client links of every secret form.

Pure rendering: the end-to-end proof of the PROXY-protocol mode is
test/integration/test_proxy_protocol.py, with real containers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tomllib
import urllib.parse
from pathlib import Path

import jinja2
import pytest
from test_settings import SECRET, loader_stubs, mtproxy, settings  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mtproxy_flavor_under_test", REPO / "_modules" / "mtproxy_flavor.py")
flavors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flavors)

SECOND = "8e1f5f0c2b7e9a1d4c3b6f0a2d4c6b8e"
AD_TAG = "3c09c680b76ee91a4c25ad51f742267d"
DOMAIN = "www.example.com"
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(REPO / "mtproxy" / "templates"))


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
    assert spec["entrypoint"] is None and spec["command"] == "/etc/mtprotoproxy/config.py"
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
        "bind-to": "203.0.113.10:4432",
        "proxy-protocol-listener": client_ip == "proxy_protocol",
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


def test_official_runs_the_wrapper_with_its_environment():
    resolved = cell(flavor="official", extra_secrets=[SECOND], ad_tag=AD_TAG, replica_environment={"WORKERS": 4})
    assert resolved["modes"] == ["secure"]
    spec = replica_spec(resolved, 1)
    assert spec["image"] == "telegrammessenger/proxy:latest"
    assert spec["entrypoint"] == "/bin/sh" and spec["command"] == "/etc/mtproxy-formula/run.sh"
    assert spec["environment"] == {
        "WORKERS": "4",
        "SECRET": f"{SECRET},{SECOND}",
        "TAG": AD_TAG,
        "PORT": "4432",
        "STATS_PORT": "14432",
    }
    assert any(label.startswith("mtproxy-formula.config=") for label in spec["labels"])
    assert "source 0.0.0.0 usesrc clientip" in haproxy_backend(resolved)


def test_official_wrapper_passes_port_secrets_and_tag_to_mtproto_proxy(tmp_path):
    """The wrapper, run by sh with curl and mtproto-proxy replaced by stubs
    that record their arguments."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "curl").write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\necho data > "$2"\n')
    (tmp_path / "bin" / "mtproto-proxy").write_text('#!/bin/sh\necho "$@" > "$ARGS"\n')
    for stub in (tmp_path / "bin").iterdir():
        stub.chmod(0o755)
    wrapper = flavors.OFFICIAL_WRAPPER.replace("data=/data", f"data={tmp_path}/data").replace(
        "/usr/local/bin/mtproto-proxy", str(tmp_path / "bin" / "mtproto-proxy")
    )
    environment = replica_spec(cell(flavor="official", extra_secrets=[SECOND], ad_tag=AD_TAG))["environment"]
    run = subprocess.run(
        ["sh", "-c", wrapper],
        env={**environment, "PATH": f"{tmp_path}/bin:/usr/bin:/bin", "ARGS": str(tmp_path / "args")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-H") + 1] == "4431" and args[args.index("-p") + 1] == "14431"
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "-S"] == [SECRET, SECOND]
    assert args[args.index("-P") + 1] == AD_TAG and args[args.index("-M") + 1] == "1"
    assert args[-1] == f"{tmp_path}/data/proxy-multi.conf"
    assert os.path.getsize(tmp_path / "data" / "proxy-secret") > 0


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
