"""The documents stay usable: every relative link reaches a file and a heading, and the flag tables are the parser's."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

RESULTS = REPO / "benchmarks" / "results"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(RESULTS.glob("*.md")),
             RESULTS / "gpu" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code fences)."""
    out, fence = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_relative_link_reaches_a_file_and_its_heading():
    broken = []
    for document in DOCUMENTS:
        text = document.read_text()
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.exists():
                broken.append(f"{document.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.is_file() and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{document.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_flag_tables_are_written_from_the_parser():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "flag_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_flag_reference_names_every_flag_of_every_subcommand():
    from fedlease.cli import build_parser

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import flag_reference
    finally:
        sys.path.pop(0)
    page = (REPO / "docs" / "flags.md").read_text()
    for name, sub in flag_reference.subcommands(build_parser()).items():
        section = page.split(f"## fedlease {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section, (name, flag)
