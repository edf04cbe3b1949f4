"""mtproxy:vip (floating addresses) in the pillar schema: every bad value is
refused naming the key, the value (the VRRP password as <hidden>) and what
is allowed; good values come out normalised. mtproxy.links names the
floating addresses."""

from __future__ import annotations

import urllib.parse

import pytest
from test_schema import assert_refused
from test_settings import configure_loader_modules, loader_stubs, mtproxy, schema, settings  # noqa: F401 (fixtures)

A = {"address": "203.0.113.100", "router_id": 51, "owner": "cell-1"}
B = {"address": "203.0.113.101", "router_id": "52", "owner": "cell-2"}


def vip_changes(**changes) -> dict:
    """settings() changes: mtproxy:vip enabled on eth0 for A and B, with ``changes`` to vip."""
    vip = {"enabled": True, "interface": "eth0", "addresses": [A, B], **changes}
    return {f"vip__{key}": value for key, value in vip.items()}


def vip(**changes) -> dict:
    return settings(**vip_changes(**changes))


def test_good_settings_come_out_typed():
    result = schema.validate(vip(password="pw-1"))["vip"]
    assert result["addresses"][1] == {"address": "203.0.113.101", "router_id": 52, "owner": "cell-2"}
    assert result["password"] == "pw-1"


def test_disabled_by_default_and_valid_without_addresses():
    assert schema.validate(settings())["vip"]["enabled"] is False


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"addresses": [{**A, "address": "203.0.113.300"}]}, "vip:addresses:0:address", "IPv4 unicast address"),
        ({"addresses": [{**A, "address": "224.0.0.18"}]}, "vip:addresses:0:address", "not loopback, multicast"),
        ({"addresses": [{**A, "address": "2001:db8::1"}]}, "vip:addresses:0:address", "IPv4"),
        ({"addresses": [{**A, "router_id": 0}]}, "vip:addresses:0:router_id", "from 1 to 255"),
        ({"addresses": [{**A, "router_id": 256}]}, "vip:addresses:0:router_id", "from 1 to 255"),
        ({"addresses": [{**A, "owner": "bad owner"}]}, "vip:addresses:0:owner", "minion id"),
        ({"addresses": [{"address": "203.0.113.100"}]}, "vip:addresses:0", "{address: <IPv4>, router_id"),
        ({"addresses": [A, {**B, "router_id": 51}]}, "vip:addresses:1:router_id", "vip:addresses:0 has it too"),
        ({"addresses": [A, {**B, "address": A["address"]}]}, "vip:addresses:1:address", "vip:addresses:0 has it"),
        ({"addresses": []}, "vip:addresses", "list at least one"),
        ({"priority": 255}, "vip:priority", "from 1 to 254"),
        ({"backup_priority": 0}, "vip:backup_priority", "from 1 to 254"),
        ({"backup_priority": 150}, "vip:backup_priority", "from 1 to 149, below vip:priority"),
        ({"interface": ""}, "vip:interface", "name the interface"),
        ({"interface": "eth0 up"}, "vip:interface", "network interface name"),
        ({"interface": "a-very-long-interface"}, "vip:interface", "network interface name"),
        ({"peers": ["203.0.113.100"]}, "vip:peers:0", "it is a virtual address"),
        ({"peers": ["host.example.com"]}, "vip:peers:0", "IPv4"),
        ({"advert_int": 0}, "vip:advert_int", "from 1 to 255"),
    ],
)
def test_bad_values_are_refused_naming_the_key(changes, key, fragment):
    assert_refused(vip_changes(**changes), key, fragment)


@pytest.mark.parametrize("password", ["too-long-9", "has#hash", "has space", 'quo"te', "x!"])
def test_a_bad_password_is_refused_and_never_shown(password):
    message = assert_refused(vip_changes(password=password), "vip:password", "<hidden>", "1 to 8")
    assert password not in message


def test_a_control_character_in_the_password_is_not_shown():
    message = assert_refused(vip_changes(password="pw\n1"), "vip:password", "<hidden>", "control character")
    assert "pw" not in message


def test_the_frontend_must_listen_on_every_address():
    assert_refused({**vip_changes(), "haproxy__frontend_bind": "203.0.113.10"}, "haproxy:frontend_bind", "use 0.0.0.0")


def servers(links: list[dict]) -> list[str]:
    return [urllib.parse.parse_qs(urllib.parse.urlparse(link["tg"]).query)["server"][0] for link in links]


def test_links_name_every_floating_address_when_enabled():
    cell = mtproxy.resolve(vip())
    links = mtproxy.links(cell=cell)
    assert sorted(set(servers(links))) == ["203.0.113.100", "203.0.113.101"]
    assert len(links) == 2 * len(mtproxy.links(cell=mtproxy.resolve(settings())))


def test_links_name_the_public_host_without_vip():
    assert set(servers(mtproxy.links(cell=mtproxy.resolve(settings())))) == {"203.0.113.10"}
