"""The docs keep up with the code: every command documented, the README's commands are CI's."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from cachehub.cli.main import app

ROOT = Path(__file__).resolve().parent.parent


def command_names(typer_app: typer.Typer, prefix: str = "cachehub") -> list[str]:
    names = []
    for cmd in typer_app.registered_commands:
        name = cmd.name or (cmd.callback.__name__.replace("_", "-") if cmd.callback else "")
        names.append(f"{prefix} {name}")
    for group in typer_app.registered_groups:
        names += command_names(group.typer_instance, f"{prefix} {group.name}")
    return names


def test_every_command_has_a_section_in_the_cli_reference() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    headings = set(re.findall(r"^## `([^`]+)`", text, flags=re.M))
    names = command_names(app)
    assert len(names) >= 15
    missing = [n for n in names if n not in headings]
    assert not missing, f"document these in docs/cli.md: {missing}"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_docs_link_only_to_files_that_exist() -> None:
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
