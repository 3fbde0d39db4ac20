"""Write the flag tables of the documents from the command line's own parser, so that they cannot drift from it.

    python tools/flag_reference.py          # rewrite docs/flags.md and the run table in README.md
    python tools/flag_reference.py --check  # exit 1 if either is out of date (the test suite runs this)

docs/flags.md: every subcommand, every flag with its default and its whole help text. README.md: between the
``<!-- run-flags -->`` markers, every flag of ``fedlease run`` with its default and the first sentence of its help.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

from fedlease.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- run-flags:start -->", "<!-- run-flags:end -->"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """(flag, default, help) for every option and positional except --help; the default as argparse holds it."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = " / ".join(action.option_strings) or action.metavar or action.dest
        if isinstance(action, argparse._StoreTrueAction):
            default = "off"
        elif action.required or not action.option_strings:
            default = "required"
        elif action.default is None:
            default = "-"
        elif isinstance(action.default, list):  # runs of one value as value:N, as --tasks writes them
            runs = [(value, sum(1 for _ in group)) for value, group in itertools.groupby(action.default)]
            default = " ".join(f"{value}:{n}" if n > 1 else str(value) for value, n in runs)
        else:
            default = str(action.default)
        text = (action.help or "").replace("|", "\\|")
        text = text.removesuffix(f" (default: {action.default})")  # the column says it
        if action.choices and "{" not in text:
            text += f" [{', '.join(map(str, action.choices))}]"
        out.append((f"`{name}`", f"`{default}`" if default not in ("-", "off", "required") else default, text))
    return out


def first_sentence(text: str) -> str:
    """Up to the first full stop that a capital letter follows, with the choices, if the help lists them, kept."""
    match = re.match(r"(.+?)(?<!e\.g)\.(\s+[A-Z]|$)", text)
    head = match.group(1) if match else text
    choices = re.search(r" \[[^\]]*\]$", text)
    return head + (choices.group(0) if choices and not head.endswith(choices.group(0)) else "")


def flags_page(parser: argparse.ArgumentParser) -> str:
    parts = ["# Every flag",
             "",
             "Written by `python tools/flag_reference.py` from the command line's own parser (a test checks that",
             "it is current); `fedlease COMMAND --help` prints the same. `fedlease compare` takes every flag of",
             "`fedlease run` except `--method` and `--seed`.",
             ""]
    for name, sub in subcommands(parser).items():
        parts += [f"## fedlease {name}", "", (sub.description or "").strip(), "",
                  "| flag | default | what it does |", "|---|---|---|"]
        parts += [f"| {flag} | {default} | {text} |" for flag, default, text in rows(sub)]
        parts.append("")
    return "\n".join(parts)


def run_table(parser: argparse.ArgumentParser) -> str:
    lines = [START, "| flag | default | what it does |", "|---|---|---|"]
    run = subcommands(parser)["run"]
    lines += [f"| {flag} | {default} | {first_sentence(text)} |" for flag, default, text in rows(run)]
    return "\n".join(lines + [END])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    cli = build_parser()
    page_path, readme_path = REPO / "docs" / "flags.md", REPO / "README.md"
    readme = readme_path.read_text()
    if START not in readme or END not in readme:
        sys.exit(f"README.md lacks the {START} / {END} markers")
    new_readme = readme[:readme.index(START)] + run_table(cli) + readme[readme.index(END) + len(END):]
    new_page = flags_page(cli)
    stale = [p.name for p, old, new in ((page_path, page_path.read_text() if page_path.exists() else "", new_page),
                                        (readme_path, readme, new_readme)) if old != new]
    if args.check:
        if stale:
            print(f"out of date: {', '.join(stale)}; run python tools/flag_reference.py", file=sys.stderr)
        return 1 if stale else 0
    page_path.parent.mkdir(exist_ok=True)
    page_path.write_text(new_page)
    readme_path.write_text(new_readme)
    print(f"wrote {page_path.relative_to(REPO)} and the run table of README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
