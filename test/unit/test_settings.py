"""Pure logic of mtproxy.resolve: every bad pillar value gets one clear error
naming the key, the value and what is allowed; good values derive the cell.

Salt's loader is replaced by a few stubs here (host address, Salt options),
through pytest-salt-factories' loader mocks: this is the validation logic
alone. The integration tests show the same
errors stopping a real apply before anything changes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from modules import execution_module
from salt.utils.secret import MaskedDict

REPO = Path(__file__).resolve().parents[2]
mtproxy = execution_module("mtproxy")
schema = execution_module("mtproxy_schema")
flavors = execution_module("mtproxy_flavor")
# Salt's loader gives both modules salt.exceptions; here they share the error class.
schema.SettingsError = mtproxy.SettingsError

DEFAULTS = yaml.safe_load((REPO / "mtproxy" / "parameters" / "defaults.yaml").read_text())["mtproxy"]
SECRET = "5f0c2b7e9a1d4c3b8e6f0a2d4c6b8e1f"


def loader_modules() -> dict:
    """Salt's loader dunders of the settings modules: the host's address, Salt's
    options, and the functions they call on each other."""
    return {
        mtproxy: {
            "__salt__": {
                "network.default_route": lambda family: [{"interface": "eth0"}],
                "network.interface_ip": lambda iface: "203.0.113.10",
                "config.option": lambda key, default=None: default,
                "mtproxy_schema.validate": schema.validate,
            },
            "__opts__": {"test": False},
            "__grains__": {},
        },
        # The schema asks the flavor records what each flavor supports.
        schema: {"__salt__": {"mtproxy_flavor.names": flavors.names, "mtproxy_flavor.check": flavors.check}},
    }


@pytest.fixture
def configure_loader_modules():
    """pytest-salt-factories sets these up before each test and undoes them after."""
    return loader_modules()


@pytest.fixture(autouse=True)
def loader_stubs(monkeypatch, tmp_path):
    """The generated secret's file, below tmp_path."""
    monkeypatch.setitem(DEFAULTS, "secret_file", str(tmp_path / "lib" / "secret"))
    return tmp_path / "lib" / "secret"


def settings(**changes) -> dict:
    result = copy.deepcopy(DEFAULTS)
    for key, value in changes.items():
        node = result
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return result


def test_defaults_derive_a_two_replica_cell(loader_stubs):
    cell = mtproxy.resolve(settings())
    assert cell["ports"] == [4431, 4432]
    assert [r["name"] for r in cell["replica_list"]] == ["mtproxy_1", "mtproxy_2"]
    assert cell["backend_address"] == "203.0.113.10"
    assert cell["public_host"] == "203.0.113.10"
    assert cell["haproxy"]["server_options"].startswith("check inter 1s fastinter 250ms")
    # A generated secret is kept (0600), so the next render gives the same links.
    assert len(cell["secret"]) == 32 and loader_stubs.read_text().strip() == cell["secret"]
    assert oct(loader_stubs.stat().st_mode)[-3:] == "600"
    assert mtproxy.resolve(settings())["secret"] == cell["secret"]


def test_a_generated_secret_is_not_kept_under_test_mode(monkeypatch, loader_stubs):
    monkeypatch.setitem(mtproxy.__opts__, "test", True)
    mtproxy.resolve(settings())
    assert not loader_stubs.exists()


@pytest.mark.parametrize(
    ("changes", "key", "allowed"),
    [
        ({"secret": "abc"}, "mtproxy:secret", "32 hex characters"),
        ({"secret": "z" * 32}, "mtproxy:secret", "32 hex characters"),
        ({"secret": "0" * 32}, "mtproxy:secret", "placeholder"),
        ({"secret": "0123456789abcdef0123456789abcdef"}, "mtproxy:secret", "placeholder"),
        ({"replicas": 0}, "mtproxy:replicas", "an integer from 1 to"),
        ({"replicas": -2}, "mtproxy:replicas", "an integer from 1 to"),
        ({"replicas": "two"}, "mtproxy:replicas", "an integer from 1 to"),
        ({"replicas": 2.5}, "mtproxy:replicas", "an integer from 1 to"),
        ({"replicas": True}, "mtproxy:replicas", "an integer from 1 to"),
        ({"replicas": 65}, "mtproxy:replicas", "from 1 to 64 (max_replicas)"),
        ({"base_port": 0}, "mtproxy:base_port", "from 1 to 65535"),
        ({"base_port": 70000}, "mtproxy:base_port", "from 1 to 65535"),
        ({"base_port": 65535, "replicas": 2}, "mtproxy:base_port", "below 65536"),
        ({"haproxy__frontend_port": 4432}, "mtproxy:haproxy:frontend_port", "replica port range"),
        ({"haproxy__stats_port": 4431}, "mtproxy:haproxy:stats_port", "replica port range"),
        ({"haproxy__stats_port": 8443}, "mtproxy:haproxy:stats_port", "its own port"),
        ({"haproxy__frontend_port": 0}, "mtproxy:haproxy:frontend_port", "from 1 to 65535"),
        ({"haproxy__balance": "random"}, "mtproxy:haproxy:balance", "leastconn, roundrobin"),
        ({"tproxy__method": "dnat"}, "mtproxy:tproxy:method", "mark, sport"),
        ({"tproxy__family": "ipv5"}, "mtproxy:tproxy:family", "ipv4, ipv6, both"),
        ({"image": "Not An Image!"}, "mtproxy:image", "image reference"),
        ({"haproxy__image": ""}, "mtproxy:haproxy:image", "image reference"),
        ({"haproxy__stats_bind": "0.0.0.0"}, "mtproxy:haproxy:stats_bind", "stats_auth"),
        ({"haproxy__stats_auth": "admin"}, "mtproxy:haproxy:stats_auth", "user:password"),
        ({"haproxy__frontend_bind": "everywhere"}, "mtproxy:haproxy:frontend_bind", "IP address"),
        ({"tls_domain": "not a domain"}, "mtproxy:tls_domain", "DNS name"),
        ({"haproxy__health_check__profile": "turbo"}, "mtproxy:haproxy:health_check:profile", "fast, original"),
        ({"haproxy__splice": "yes"}, "mtproxy:haproxy:splice", "true or false"),
        ({"haproxy__redispatch": 1}, "mtproxy:haproxy:redispatch", "true or false"),
        ({"flavor": "tdlib"}, "mtproxy:flavor", "mtprotoproxy, official, mtg"),
        ({"client_ip": "xff"}, "mtproxy:client_ip", "tproxy, proxy_protocol"),
        ({"flavor": "official", "client_ip": "proxy_protocol"}, "mtproxy:client_ip", "does not accept the PROXY"),
        ({"flavor": "official", "base_port": 60000}, "mtproxy:base_port", "port+10000"),
        ({"flavor": "mtg"}, "mtproxy:tls_domain", "needs a domain"),
        ({"flavor": "mtg", "tls_domain": "a.example.com", "modes": ["secure"]}, "mtproxy:modes", "serves tls"),
        ({"flavor": "official", "modes": ["tls"]}, "mtproxy:modes", "serves classic, secure"),
        ({"modes": ["tls"]}, "mtproxy:tls_domain", "needs a domain"),
        ({"modes": "secure"}, "mtproxy:modes", "use a list (up to 3) of classic | secure | tls"),
        ({"modes": ["fast"]}, "mtproxy:modes:0", "use one of classic, secure, tls"),
        ({"extra_secrets": ["abc"]}, "mtproxy:extra_secrets:0", "32 hex characters"),
        (
            {"extra_secrets": "5f0c2b7e9a1d4c3b8e6f0a2d4c6b8e1f"},
            "mtproxy:extra_secrets",
            "a list (up to 15) of 32 hex characters",
        ),
        ({"secret": SECRET, "extra_secrets": [SECRET]}, "mtproxy:extra_secrets", "must differ"),
        ({"extra_secrets": [f"{i:02x}" * 16 for i in range(17, 33)]}, "mtproxy:extra_secrets", "up to 15"),
        (
            {"flavor": "mtg", "tls_domain": "a.example.com", "extra_secrets": ["7a" * 16]},
            "mtproxy:extra_secrets",
            "one secret per instance",
        ),
        ({"flavor": "official", "tls_domain": "a.example.com"}, "mtproxy:tls_domain", "no fake-TLS"),
        ({"flavor": "official", "handshake_timeout": 30}, "mtproxy:handshake_timeout", "use 0"),
        ({"ad_tag": "123"}, "mtproxy:ad_tag", "@MTProxybot"),
        (
            {"flavor": "mtg", "tls_domain": "a.example.com", "ad_tag": "3c09c680b76ee91a4c25ad51f742267d"},
            "mtproxy:ad_tag",
            "no ad tag",
        ),
        ({"boot__watch_interval": 0}, "mtproxy:boot:watch_interval", "from 1 to 3600"),
        ({"boot__watch_interval": "often"}, "mtproxy:boot:watch_interval", "from 1 to 3600"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(changes, key, allowed):
    with pytest.raises(mtproxy.SettingsError) as error:
        mtproxy.resolve(settings(**changes))
    message = str(error.value)
    assert message.startswith(f"Pillar {key} is ")
    assert allowed in message


def test_a_bad_secret_is_not_echoed():
    with pytest.raises(mtproxy.SettingsError) as error:
        mtproxy.resolve(settings(secret="0" * 32))
    assert "0" * 32 not in str(error.value)


def test_public_stats_with_credentials_is_accepted():
    cell = mtproxy.resolve(settings(haproxy__stats_bind="0.0.0.0", haproxy__stats_auth="ops:correct-horse"))
    assert cell["haproxy"]["stats_auth"] == "ops:correct-horse"


def test_default_modes_are_padded_plus_fake_tls_when_a_domain_is_set():
    assert mtproxy.resolve(settings())["modes"] == ["secure"]
    assert mtproxy.resolve(settings(tls_domain="www.example.com"))["modes"] == ["secure", "tls"]


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
KEYS = [
    "flavor",
    "client_ip",
    "extra_secrets",
    "modes",
    "ad_tag",
    "replicas",
    "max_replicas",
    "base_port",
    "secret",
    "tls_domain",
    "image",
    "backend_address",
    "public_host",
    "haproxy__frontend_port",
    "haproxy__stats_port",
    "haproxy__frontend_bind",
    "haproxy__stats_bind",
    "haproxy__stats_auth",
    "haproxy__balance",
    "haproxy__maxconn",
    "haproxy__splice",
    "haproxy__redispatch",
    "haproxy__image",
    "haproxy__health_check__profile",
    "tproxy__method",
    "tproxy__family",
    "tproxy__mark",
    "tproxy__table",
]


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), ANY_VALUE, min_size=1, max_size=4))
def test_any_value_is_accepted_or_refused_clearly(changes):
    """Random types and values never end in a traceback: either the settings
    resolve, or one SettingsError names the pillar key."""
    try:
        mtproxy.resolve(settings(**changes))
    except mtproxy.SettingsError as error:
        assert str(error).startswith("Pillar mtproxy:")


# -- mtproxy.settings: the layering, the masked debugging view -----------------------

PARAMETERS = REPO / "mtproxy" / "parameters"


def file_server(url: str) -> str | bool:
    """``cp.get_file_str`` over the checkout's mtproxy/ folder: False for a missing file, as Salt's."""
    path = REPO / url.removeprefix("salt://")
    return path.read_text() if path.is_file() else False


@pytest.fixture
def salt_side(monkeypatch, loader_stubs):
    """What settings() asks Salt for: the file server, grains, pillar and mtproxy_bootstrap.resolve.
    The pillar is Salt 3008's, whose values print masked but read plain."""
    pillar = MaskedDict({"mtproxy": {"secret_file": str(loader_stubs)}})
    calls: list[bool] = []

    def bootstrap_resolve(layered: dict, bootstrapping: bool = False) -> dict:
        calls.append(bootstrapping)
        return mtproxy.resolve(layered, generate_secret=not bootstrapping)

    grains = {"os_family": "Debian"}
    for name, function in {
        "cp.get_file_str": file_server,
        "grains.get": lambda key, default="": grains.get(key, default),
        "mtproxy_bootstrap.resolve": bootstrap_resolve,
    }.items():
        monkeypatch.setitem(mtproxy.__salt__, name, function)
    monkeypatch.setattr(mtproxy, "__pillar__", pillar, raising=False)
    return pillar, grains, calls


def test_layers_defaults_then_os_family_then_lookup_then_pillar(salt_side):
    pillar, grains, _ = salt_side
    pillar["mtproxy"].update(
        {"replicas": 3, "haproxy": {"stats_port": 8500}, "lookup": {"replicas": 5, "haproxy": {"maxconn": 999}}}
    )
    layered = mtproxy.layered()
    assert layered["replicas"] == 3  # the pillar over its lookup
    assert layered["haproxy"]["maxconn"] == 999  # lookup over the defaults, key by key
    assert layered["haproxy"]["stats_port"] == 8500
    assert layered["haproxy"]["frontend_port"] == DEFAULTS["haproxy"]["frontend_port"]
    assert "lookup" not in layered
    debian = yaml.safe_load((PARAMETERS / "os_family" / "Debian.yaml").read_text())["mtproxy"]
    for key, value in debian.items():
        assert layered[key] == (mtproxy._merged(DEFAULTS[key], value) if isinstance(value, dict) else value)
    # A family without a file of its own gets Debian's, as before.
    grains["os_family"] = "Arch"
    assert mtproxy.layered() == layered


def test_lists_are_replaced_not_merged():
    assert mtproxy._merged({"a": [1, 2], "b": {"c": 1, "d": 2}}, {"a": [3], "b": {"d": 4}}) == {
        "a": [3],
        "b": {"c": 1, "d": 4},
    }


def test_a_formula_missing_from_the_file_server_is_named(salt_side, monkeypatch):
    monkeypatch.setitem(mtproxy.__salt__, "cp.get_file_str", lambda url: False)
    with pytest.raises(mtproxy.CommandExecutionError, match="salt://mtproxy/parameters/"):
        mtproxy.settings()


def test_settings_hide_every_credential_unless_asked(salt_side):
    pillar, _, _ = salt_side
    extra = "3c09c680b76ee91a4c25ad51f742267d"
    pillar["mtproxy"].update(
        {
            "secret": SECRET,
            "extra_secrets": [extra],
            "haproxy": {"stats_auth": "ops:correct-horse-battery"},
            "exporter": {"auth": "prom:staple-battery-horse"},
        }
    )
    shown = mtproxy.settings()
    assert shown["secret"] == "<hidden>" and shown["extra_secrets"] == ["<hidden>"]
    assert shown["secrets"] == ["<hidden>", "<hidden>"]
    assert shown["haproxy"]["stats_auth"] == "<hidden>" and shown["exporter"]["auth"] == "<hidden>"
    text = json.dumps(shown)
    for hidden in (SECRET, extra, "correct-horse-battery", "staple-battery-horse"):
        assert hidden not in text
    assert shown["replica_list"][0]["name"] == "mtproxy_1"  # the rest as it is
    full = mtproxy.settings(show_secrets=True)
    assert full["secrets"] == [SECRET, extra]
    assert full["haproxy"]["stats_auth"] == "ops:correct-horse-battery"


def test_an_empty_secret_stays_empty_in_the_masked_view(salt_side):
    # The bootstrap renders without making a secret: nothing to hide, and "" says so.
    shown = mtproxy.settings(bootstrapping=True)
    assert shown["secret"] == "" and shown["haproxy"]["stats_auth"] == ""


def test_every_call_gives_the_same_generated_secret(salt_side, loader_stubs):
    first = mtproxy.settings(show_secrets=True)["secret"]
    assert loader_stubs.read_text().strip() == first
    assert mtproxy.settings(show_secrets=True)["secret"] == first
    assert mtproxy.links()[0]["tg"].endswith(f"&secret=dd{first}")


def test_under_test_mode_the_unkept_secret_is_the_same_for_the_whole_run(salt_side, monkeypatch, loader_stubs):
    monkeypatch.setitem(mtproxy.__opts__, "test", True)
    first = mtproxy.settings(show_secrets=True)["secret"]
    assert mtproxy.settings(show_secrets=True)["secret"] == first
    assert not loader_stubs.exists()


def test_the_bootstrap_renders_without_refusal_or_secret(salt_side, loader_stubs):
    _, _, calls = salt_side
    assert mtproxy.settings(bootstrapping=True)["secret"] == ""
    assert calls == [True] and not loader_stubs.exists()
    mtproxy.settings()
    assert calls == [True, False]


def test_masked_links_hide_the_secret_but_keep_its_start(salt_side):
    pillar, _, _ = salt_side
    pillar["mtproxy"]["secret"] = SECRET
    (link,) = mtproxy.links(masked=True)
    assert SECRET not in link["tg"] and f"secret=dd{SECRET[:4]}" in link["tg"]
    cell = mtproxy.settings(show_secrets=True)
    assert mtproxy.links(cell=cell) == mtproxy.links()


def test_the_os_family_file_wins_over_the_defaults_and_loses_to_lookup(salt_side, monkeypatch):
    pillar, _, _ = salt_side

    def with_family_file(url: str) -> str | bool:
        if url.endswith("/os_family/Debian.yaml"):
            return "mtproxy:\n  replicas: 4\n  haproxy:\n    maxconn: 777\n"
        return file_server(url)

    monkeypatch.setitem(mtproxy.__salt__, "cp.get_file_str", with_family_file)
    assert (mtproxy.layered()["replicas"], mtproxy.layered()["haproxy"]["maxconn"]) == (4, 777)
    pillar["mtproxy"]["lookup"] = {"replicas": 5}
    assert (mtproxy.layered()["replicas"], mtproxy.layered()["haproxy"]["maxconn"]) == (5, 777)


def test_every_key_the_schema_hides_is_masked_by_settings():
    hidden = {key for key, spec in schema.SCHEMA.items() if spec.hidden}
    assert hidden and hidden <= set(mtproxy.CREDENTIALS), hidden - set(mtproxy.CREDENTIALS)


def test_a_host_without_iproute2_takes_its_address_from_the_grains(monkeypatch):
    # Salt's network.default_route fails with a traceback of its own without `ip`.
    def no_ip(family):
        raise ValueError("'NoneType' object is not iterable")

    monkeypatch.setitem(mtproxy.__salt__, "network.default_route", no_ip)
    monkeypatch.setitem(mtproxy.__grains__, "ip4_interfaces", {"lo": ["127.0.0.1"], "ens3": ["198.51.100.7"]})
    assert mtproxy.primary_ipv4() == "198.51.100.7"
    assert mtproxy.resolve(settings())["public_host"] == "198.51.100.7"
