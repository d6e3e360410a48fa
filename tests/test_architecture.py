"""The shape the code keeps (docs/architecture.md): layers one way round, one owner per state.

These read the sources as text and syntax trees; they fail with the offending module and line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cachehub"
# the facade and the entry points may import the facade; nothing else may
FACADE_USERS = {"cachehub", "cachehub.api", "cachehub.web"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package ``name`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                target = next((t for t in (f"{base}.{alias.name}", base) if t in known), None)
                if target and target != name:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known and a.name != name)
    return found


def test_the_package_has_no_import_cycle() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    on_cycle = sorted(m for m in modules if m != "cachehub" and m in reach(m))
    assert not on_cycle, f"modules on an import cycle: {on_cycle}"


def test_only_the_facade_and_entry_points_import_the_hub() -> None:
    modules = _modules()
    offenders = [m for m, p in modules.items() if m not in FACADE_USERS and "cachehub.api" in _imports(m, p, set(modules))]
    assert not offenders, f"workers must take a Context, not import the Hub: {offenders}"


def _sources(*dirs: str) -> list[tuple[Path, list[str]]]:
    return [(p, p.read_text().splitlines()) for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]


def _hits(pattern: str, allowed: set[str], *dirs: str) -> list[str]:
    rx = re.compile(pattern)
    out = []
    for path, lines in _sources(*dirs):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        out += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(lines, 1) if rx.search(line)]
    return out


def test_every_sql_statement_lives_in_the_catalog() -> None:
    sql = r"\b(SELECT [^\"']* FROM|INSERT (OR [A-Z]+ )?INTO|UPDATE [a-z_]+ SET|DELETE FROM|CREATE TABLE|ALTER TABLE)\b"
    hits = _hits(sql, {"cachehub/catalog.py"}, "cachehub", "cli", "backends")
    assert not hits, "SQL outside cachehub/catalog.py:\n" + "\n".join(hits)


def test_every_lake_key_is_spelled_in_the_lake_module() -> None:
    key = r"""[f]?["'](objects/sha256|chunks/sha256|manifests/sha256|datasets/|runs/|audit/|cachehub-lake\.json)"""
    # store.py lays out a site root, whose objects/sha256/ mirrors the lake's by design
    hits = _hits(key, {"cachehub/lake.py", "cachehub/store.py"}, "cachehub", "cli")
    assert not hits, "lake keys spelled outside cachehub/lake.py:\n" + "\n".join(hits)


def test_every_site_path_is_spelled_in_the_store() -> None:
    path = r"""(root\s*/\s*["']|["']cachehub-site\.json)"""
    hits = _hits(path, {"cachehub/store.py"}, "cachehub", "cli")
    assert not hits, "paths under a site root spelled outside cachehub/store.py:\n" + "\n".join(hits)


def test_the_facade_stays_thin() -> None:
    lines = (PACKAGE / "api.py").read_text().count("\n")
    assert lines < 400, f"cachehub/api.py has {lines} lines: move the logic into a worker module"
