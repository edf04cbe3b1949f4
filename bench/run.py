"""`make bench`: deploy cells with the formula into a test host, measure, write bench/results.md.

Sections (bench/sections.py): salt, failover, operations, concurrency,
datapath (synthetic backend), realpath (real replicas and the stand-in data
centre), replay_guard, run in that order in one test host. Every number is reported as a
median with its spread and as a ratio against a baseline measured in the same
run: the machines are shared and noisy, timings alone mean little.

    bench/run.py                          # everything, writes bench/results.md, results.json, results.png
    bench/run.py --quick --out /tmp/b     # small numbers, for development
    bench/run.py --only failover,salt     # some sections
    bench/run.py --only realpath --merge bench/results.json   # these sections again, the others kept
    bench/run.py --formula-ref HEAD       # deploy the committed formula, not the work tree
    bench/run.py --render bench/results.json   # the report again from a saved run (no measuring)

Exits non-zero only when it could not run (no test host, a deploy failed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "test"), str(REPO)]

import yaml  # noqa: E402
from testhost import VENV_BIN, TestHost  # noqa: E402

from bench import report  # noqa: E402
from bench.sections import SECTIONS, Cell, Plan  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False).stdout.strip()


def export_formula(ref: str, into: Path) -> str:
    """The formula (mtproxy/, _modules/, _states/) as committed at ``ref``, into ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "mtproxy", "_modules", "_states"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return git("rev-parse", "--short", ref)


def formula_defaults(root: Path) -> dict:
    """The deployed formula's HAProxy defaults that the data-path verdict is about."""
    haproxy = yaml.safe_load((root / "mtproxy" / "parameters" / "defaults.yaml").read_text())["mtproxy"]["haproxy"]
    return {"splice": haproxy.get("splice"), "maxconn": haproxy.get("maxconn")}


def versions(host: TestHost) -> dict:
    def out(args: list[str]) -> str:
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        return (proc.stdout or proc.stderr).strip()

    def in_container(name: str, *args: str) -> str:
        return host.docker("exec", name, *args, check=False).stdout.strip()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1),
        "kernel": platform.release(),
        "os": out(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "salt": out([str(VENV_BIN / "salt-call"), "--version"]).split()[-2:][0],
        "docker": host.docker("version", "--format", "{{.Server.Version}}", check=False).stdout.strip(),
        # "HAProxy version 3.0.11-1+deb13u4 2026/10/15 - https://haproxy.org/"
        "haproxy": (in_container("mtproxy_haproxy", "haproxy", "-v").split() or ["?"] * 3)[2],
        "mtprotoproxy": in_container(
            "mtproxy_1", "python3", "-c", "import importlib.metadata as m; print(m.version('mtprotoproxy'))"
        ),
    }


def merge(base: dict, new: dict) -> dict:
    """``base`` (an earlier run) with the sections measured in ``new`` replaced;
    each section keeps when, how and on which formula it was measured."""
    merged = dict(base)
    runs = merged.setdefault("section_runs", {})
    for name in base.get("sections", {}):
        runs.setdefault(name, {k: base.get(k) for k in ("date", "formula", "command", "plan")})
    for key in ("sections", "errors", "section_seconds"):
        merged[key] = {
            k: v for k, v in base.get(key, {}).items() if k not in new["sections"] and k not in new["errors"]
        }
        merged[key].update(new.get(key, {}))
    for name in [*new["sections"], *new["errors"]]:
        runs[name] = {k: new.get(k) for k in ("date", "formula", "command", "plan")}
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small numbers, for development")
    parser.add_argument("--only", help=f"comma-separated sections out of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench", help="folder for results.md/.json/.png")
    parser.add_argument("--formula-ref", help="deploy the formula as committed at this git ref")
    parser.add_argument("--render", type=Path, help="only write results.md and the plot again from a results.json")
    parser.add_argument(
        "--merge", type=Path, help="keep this results.json's other sections: replace only the ones measured now"
    )
    args = parser.parse_args(argv)
    if args.render:
        report.write(json.loads(args.render.read_text()), args.out)
        return 0
    wanted = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    plan = Plan.quick() if args.quick else Plan()
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    results: dict = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "plan": plan.__dict__ | {"quick": args.quick},
        "formula": git("describe", "--always", "--dirty") or "unknown",
        "command": " ".join(["bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "sections": {},
        "errors": {},
    }
    host = TestHost.create(f"bench{time.time_ns() % 100000}")
    with tempfile.TemporaryDirectory(prefix="mtpf-bench-") as snapshot:
        try:
            if args.formula_ref:
                host.formula_root = snapshot
                results["formula"] = export_formula(args.formula_ref, Path(snapshot)) + f" ({args.formula_ref})"
            results["formula_defaults"] = formula_defaults(Path(host.formula_root or REPO))
            log(f"test host {host.name}, formula {results['formula']}")
            host.start()
            cell = Cell(host, plan, secrets.token_hex(16), log)
            for name in (s for s in SECTIONS if s in wanted):
                log(f"section {name}")
                section_start = time.monotonic()
                try:
                    results["sections"][name] = SECTIONS[name](cell)
                except Exception:  # one section failing must not lose the others' numbers
                    results["errors"][name] = traceback.format_exc()
                    log(f"section {name} failed:\n{results['errors'][name]}")
                results.setdefault("section_seconds", {})[name] = round(time.monotonic() - section_start, 1)
            results["versions"] = versions(host)
        finally:
            host.stop()
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    log(f"done in {results['wall_seconds']} s: {args.out / 'results.md'}")
    if args.merge:
        results = merge(json.loads(args.merge.read_text()), results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write(results, args.out)
    # Could not run at all: no section produced numbers.
    return 0 if results["sections"] else 1


if __name__ == "__main__":
    sys.exit(main())
