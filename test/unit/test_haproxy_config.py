"""The HAProxy config template's switches, rendered from resolved settings:
splice (with a pipe budget that fits the open-files limit) and redispatch.
The integration tests run the default config in a real HAProxy."""

from __future__ import annotations

from test_flavors import TEMPLATES, cell
from test_settings import loader_stubs  # noqa: F401 (autouse fixture)


def rendered(**haproxy) -> list[str]:
    resolved = cell(haproxy=haproxy) if haproxy else cell()
    text = TEMPLATES.get_template("haproxy.cfg.jinja").render(mtproxy=resolved)
    return [line.strip() for line in text.splitlines()]


def descriptors_needed(lines: list[str]) -> int:
    """HAProxy's own estimate: 2 per connection, 2 per pipe (listeners aside)."""
    value = {line.split()[0]: int(line.split()[1]) for line in lines if line.split()[:1] in (["maxconn"], ["maxpipes"])}
    return 2 * value["maxconn"] + 2 * value.get("maxpipes", 0)


def test_defaults_splice_within_the_test_machines_open_files_limit():
    lines = rendered()
    assert "option splice-request" in lines and "option splice-response" in lines
    assert "maxpipes 1000" in lines
    # 20000: dockerd's open-files limit on the machines this runs on.
    assert descriptors_needed(lines) < 20000 - 100


def test_splice_off_reserves_no_pipes():
    lines = rendered(splice=False)
    assert not any("splice" in line or line.startswith("maxpipes") for line in lines)


def test_redispatch_off_is_the_original_designs_backend():
    lines = rendered(redispatch=False)
    assert "option redispatch 1" not in lines and "retries 3" not in lines
    assert "option redispatch 1" in rendered()
