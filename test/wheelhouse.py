"""A folder of wheels made from the project venv's installed distributions, offline.

Test hosts have no route out, so a bootstrap under test cannot reach PyPI; the
formula's ``mtproxy:python_packages:find_links`` points pip at this folder
instead (as an operator of an air-gapped host would point it at theirs). Each
wheel is repacked from the files an installed distribution lists in its
RECORD: exactly the pinned versions the project tests with, and no network.

    python3 test/wheelhouse.py DEST docker pyroute2 saltext.dockermod
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Salt extensions depend on Salt, which salt-ssh's thin brings along.
SKIP = {"salt"}


def _closure(names: list[str]) -> list[metadata.Distribution]:
    """The distributions ``names`` need, themselves included, without Salt."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    environment = {**default_environment(), "extra": ""}
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in SKIP:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(requirement.name)
    return list(seen.values())


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(dist: metadata.Distribution, dest: Path) -> Path:
    """One installed distribution as a wheel in ``dest`` (its files, a fresh RECORD)."""
    info = Path(str(dist._path))  # type: ignore[attr-defined]  # the .dist-info folder
    site = info.parent
    wheel_meta = (info / "WHEEL").read_text()
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    # A universal wheel lists py2 first: name it by a tag this Python accepts.
    tag = next((t for t in tags if t.startswith(("py3", "cp3"))), tags[0])
    target = dest / f"{name}-{dist.version}-{tag}.whl"
    if target.exists():
        return target
    dropped = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    rows = []
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as wheel:
        for entry in dist.files or []:
            relative = entry.as_posix()
            # Scripts live outside site-packages (../../../bin): pip writes its own.
            if relative.startswith("..") or "__pycache__" in relative or relative.endswith(".pyc"):
                continue
            if relative.startswith(info.name + "/") and relative.split("/", 1)[1] in dropped:
                continue
            data = (site / relative).read_bytes()
            wheel.writestr(relative, data)
            rows.append((relative, _digest(data), str(len(data))))
        record = f"{info.name}/RECORD"
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([*rows, (record, "", "")])
        wheel.writestr(record, out.getvalue())
    partial.rename(target)
    return target


def build(dest: Path, names: list[str]) -> list[Path]:
    """Wheels of ``names`` and their dependencies (not Salt) in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    return [repack(dist, dest) for dist in _closure(names)]


if __name__ == "__main__":
    for path in build(Path(sys.argv[1]), sys.argv[2:]):
        print(path)
