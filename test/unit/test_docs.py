"""Every reference in a code comment resolves, and the design notes link up.

Comments and docstrings in the formula, the tests, the bench, the image
recipes and the scripts cite files of the repository (``docs/return-path.md``,
``_modules/tproxy.py``), sections of the design notes (``docs/measurements.md
§2``, ``docs/architecture.md#settings``) and README sections (``README
"Cell-wide guards"``). A cited file, heading or section that does not exist
fails here, naming the file and line that cites it. The notes' own links
(docs/*.md, README.md) are checked the same way, and nothing may point at a
design file outside the repository.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("_modules", "_states", "_utils", "_runners", "mtproxy", "test", "bench", "images", "scripts")
CODE_SUFFIXES = {".py", ".sls", ".jinja", ".sh", ".yaml", ".yml"}
TOP_DIRS = "docs|mtproxy|_modules|_states|_utils|_runners|test|bench|images|scripts|examples|dashboards"
# A repository path: starts with a top-level folder, or is README.md.
PATH_REF = re.compile(rf"(?<![\w/.<$-])((?:(?:{TOP_DIRS})/[\w./-]*\w)|README\.md)")
# What may follow a cited Markdown file: #anchor, or §N / section N.
SECTION_REF = re.compile(r"\A(?:#(?P<anchor>[\w-]+)|[ \t]*\n?[ \t]*(?:§ ?|section\s+)(?P<number>\d+))")
README_TITLE_REF = re.compile(r'\bREADME "(?P<title>[^"]+)"')
MARKDOWN_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
# Folder placeholders such as images/NAME/recipe.sh.
PLACEHOLDER = re.compile(r"/[A-Z][A-Z_]*(?:/|$)")


def comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring in a code file."""
    text = path.read_text()
    if path.suffix == ".py":
        found = [
            (tok.start[0], tok.string)
            for tok in tokenize.generate_tokens(io.StringIO(text).readline)
            if tok.type == tokenize.COMMENT
        ]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    found.append((node.body[0].lineno, doc))
        return found
    found = [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in re.finditer(r"\{#.*?#\}", text, re.DOTALL)]
    found += [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in re.finditer(r"(?m)(?:^|\s)(#.*)$", text)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())  # not the comments of code blocks
    return [m.group(1).strip() for m in re.finditer(r"(?m)^#{1,6}\s+(.+)$", text)]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(path):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def numbered(path: Path, number: str) -> bool:
    """A heading ``§N ...`` (or ``N. ...``) exists."""
    return any(re.match(rf"(?:§ ?)?{number}(?:\.|\s)", heading) for heading in headings(path))


def problems_in(text: str, where: str) -> list[str]:
    """What ``text`` (a comment, or a whole Markdown file) cites that does not exist."""
    found = []
    for match in PATH_REF.finditer(text):
        ref = match.group(1)
        rest = text[match.end() :]
        if rest.startswith(("<", "/<")) or PLACEHOLDER.search(ref):
            continue
        target = REPO / ref
        if not target.exists():
            found.append(f"{where}: {ref} does not exist")
            continue
        section = SECTION_REF.match(rest)
        if section and target.suffix == ".md":
            found += section_problems(target, section, where, ref)
    for match in README_TITLE_REF.finditer(text):
        if match.group("title") not in headings(REPO / "README.md"):
            found.append(f'{where}: README.md has no section "{match.group("title")}"')
    return found


def section_problems(target: Path, section: re.Match, where: str, ref: str) -> list[str]:
    if section.group("anchor") and section.group("anchor") not in anchors(target):
        return [f"{where}: {ref} has no heading #{section.group('anchor')}"]
    if section.group("number") and not numbered(target, section.group("number")):
        return [f"{where}: {ref} has no section §{section.group('number')}"]
    return []


def link_problems(path: Path) -> list[str]:
    """Relative links of a Markdown file: the file and the heading they name exist."""
    found = []
    for match in MARKDOWN_LINK.finditer(path.read_text()):
        target, _, anchor = match.group("target").partition("#")
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        where = f"{path.relative_to(REPO)}: link {match.group('target')}"
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists():
            found.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"{where}: no such heading")
    return found


def code_files() -> list[Path]:
    return sorted(
        path
        for folder in CODE_DIRS
        if (REPO / folder).is_dir()
        for path in (REPO / folder).rglob("*")
        if path.suffix in CODE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts
    )


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_reference_in_a_comment_resolves():
    found = []
    for path in code_files():
        for line, text in comments(path):
            found += problems_in(text, f"{path.relative_to(REPO)}:{line}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_design_notes_and_readme_cite_what_exists(path):
    found = link_problems(path) + problems_in(path.read_text(), str(path.relative_to(REPO)))
    assert not found, "\n".join(found)


def test_the_design_notes_cover_what_the_comments_cite():
    for name in ("README.md", "architecture.md", "return-path.md", "decisions.md", "measurements.md"):
        assert (REPO / "docs" / name).is_file(), name
    assert {"why-tproxy", "the-boot-unit", "the-watchdog"} <= anchors(REPO / "docs" / "return-path.md")
    assert "overriding-the-haproxy-template" in anchors(REPO / "docs" / "architecture.md")


def test_nothing_points_at_a_design_file_outside_the_repository():
    needle = "design" + ".md"  # spelled apart, so this file does not match itself
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    found = []
    for name in filter(None, listed):
        path = REPO / name
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary, or deleted in the work tree
        if needle in text.lower():
            found.append(name)
    assert not found, f"these mention {needle.upper()}: {found}"


# -- the checker itself -----------------------------------------------------------


@pytest.mark.parametrize(
    ("comment", "problem"),
    [
        ("# see docs/no-such-note.md", "docs/no-such-note.md does not exist"),
        ("# measured (docs/measurements.md §6)", "docs/measurements.md has no section §6"),
        ("# docs/measurements.md section 6", "docs/measurements.md has no section §6"),
        ("# docs/return-path.md#no-such-heading", "docs/return-path.md has no heading #no-such-heading"),
        ("# _modules/no_such_module.py does it", "_modules/no_such_module.py does not exist"),
        ('# README "No such section"', 'README.md has no section "No such section"'),
    ],
)
def test_a_reference_to_what_does_not_exist_is_reported(comment, problem):
    assert problems_in(comment, "x.py:1") == [f"x.py:1: {problem}"]


@pytest.mark.parametrize(
    "comment",
    [
        "# docs/measurements.md §2, docs/measurements.md\n# section 3",
        "# docs/return-path.md#the-watchdog and docs/architecture.md#settings",
        '# README "Cell-wide guards"; images/NAME/recipe.sh; mtproxy/files/<minion id>/haproxy.cfg.jinja',
    ],
)
def test_references_that_exist_pass(comment):
    assert problems_in(comment, "x.py:1") == []


def test_comments_are_read_from_python_and_from_salt_files(tmp_path):
    py = tmp_path / "m.py"
    py.write_text('"""Doc: docs/a.md."""\nx = "docs/not-a-comment.md"  # docs/b.md\n')
    assert [text for _, text in comments(py)] == ["# docs/b.md", "Doc: docs/a.md."]
    sls = tmp_path / "s.sls"
    sls.write_text("{#- docs/c.md\n    docs/d.md #}\nkey: value  # docs/e.md\n")
    texts = " ".join(text for _, text in comments(sls))
    assert all(f"docs/{n}.md" in texts for n in "cde")


def test_anchors_follow_github():
    assert (
        slug("§3 Failover, reload and drain (HAProxy 2.6 and 3.0)") == "3-failover-reload-and-drain-haproxy-26-and-30"
    )
    assert slug("Why TPROXY") == "why-tproxy"
