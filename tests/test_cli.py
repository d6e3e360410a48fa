"""The real ``cachehub`` command in subprocesses: output shapes, --json, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from cachehub.errors import (
    ConflictError,
    DatasetNotFoundError,
    InvalidRefError,
    NotCachedError,
    RefNotFoundError,
)

from .conftest import run_cli, tree_digest, write_tree


def J(*args: str, env: dict[str, str]) -> object:
    result = run_cli(*args, "--json", env=env, check=True)
    return json.loads(result.stdout)


def test_end_to_end_on_both_backends(tmp_path: Path, env: dict[str, str]) -> None:
    src = write_tree(tmp_path / "src", {"a/1.png": "one", "a/2.png": "two", "b/3.png": "three"})
    init = J("init", env=env)
    assert init["site"] == "local"
    first = J("push", str(src), "xray", "-m", "v1 export", "--tag", "v1", env=env)
    assert first["created"] and first["uploaded_files"] == 3
    (src / "a/2.png").write_text("TWO!")
    (src / "c.png").write_text("new")
    second = J("push", str(src), "xray", "--tag", "v2", env=env)
    same = J("push", str(src), "xray", env=env)
    assert same["created"] is False and same["uploaded_files"] == 0 and same["commit"] == second["commit"]

    log = J("log", "xray", env=env)
    assert [c["id"] for c in log] == [second["commit"], first["commit"]]  # newest first
    shown = J("show", "xray@v1", env=env)
    assert shown["commit"] == first["commit"] and shown["tags"] == ["v1"] and shown["files"] == 3
    changes = J("diff", "xray@v1", "xray@v2", env=env)
    assert changes == [
        {"path": "a/2.png", "change": "modified", "old_size": 3, "new_size": 4},
        {"path": "c.png", "change": "added", "old_size": None, "new_size": 3},
    ]
    assert J("diff", "--stat", "xray@v1", "xray@v2", env=env)["modified"] == 1
    assert [e["path"] for e in J("ls", "xray@v2", "a", env=env)] == ["a/1.png", "a/2.png"]
    [ds] = J("datasets", env=env)
    assert ds["name"] == "xray" and ds["commits"] == 2 and ds["tags"] == ["v1", "v2"]

    c1 = J("cache", "xray@v1", env=env)
    assert {"dataset", "commit", "site", "path", "fetched_files", "fetched_bytes", "reused_files", "reused_bytes", "seconds"} <= c1.keys()
    c2 = J("cache", "xray@v2", env=env)
    assert c2["fetched_files"] == 2 and c2["reused_files"] == 2
    assert tree_digest(Path(c2["path"])) == tree_digest(src)
    path = run_cli("path", "xray@v2", env=env, check=True).stdout.strip()
    assert path == c2["path"]
    status = J("status", env=env)
    assert [len(s["commits"]) for s in status] == [2]
    assert J("verify", "xray@v2", env=env)["ok"] is True


def test_exit_codes_and_messages(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = local_env
    src = write_tree(tmp_path / "src", {"x": "1"})
    run_cli("push", str(src), "ds", "--tag", "v1", env=env, check=True)
    cases = [
        (("path", "nope@v1"), DatasetNotFoundError.exit_code, "cachehub push DIR nope"),
        (("path", "ds@v9"), RefNotFoundError.exit_code, "cachehub log ds"),
        (("path", "ds@@v1"), InvalidRefError.exit_code, "malformed"),
        (("path", "ds@v1"), NotCachedError.exit_code, "cachehub cache ds@v1"),
        (("tag", "ds@v1", "latest"), InvalidRefError.exit_code, "reserved"),
        (("push", str(src / "missing"), "ds"), 1, "not a directory"),
        (("push",), 2, "Missing argument"),
        (("no-such-command",), 2, "No such command"),
    ]
    for args, code, text in cases:
        result = run_cli(*args, env=env)
        assert result.returncode == code, (args, result.returncode, result.stderr)
        assert text in result.stderr, (args, result.stderr)
        if code != 2:
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert NotCachedError.exit_code == 3


def test_tag_conflict_and_force(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = local_env
    src = tmp_path / "src"
    write_tree(src, {"x": "1"})
    a = json.loads(run_cli("push", str(src), "ds", "--json", env=env, check=True).stdout)["commit"]
    write_tree(src, {"x": "2"})
    b = json.loads(run_cli("push", str(src), "ds", "--json", env=env, check=True).stdout)["commit"]
    run_cli("tag", f"ds@{a[:10]}", "prod", env=env, check=True)
    moved = run_cli("tag", f"ds@{b[:10]}", "prod", env=env)
    assert moved.returncode == ConflictError.exit_code and "--force" in moved.stderr
    run_cli("tag", f"ds@{b[:10]}", "prod", "--force", env=env, check=True)
    assert json.loads(run_cli("show", "ds@prod", "--json", env=env, check=True).stdout)["commit"] == b


def test_verify_exit_code_and_repair(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = local_env
    run_cli("push", str(write_tree(tmp_path / "src", {"x": "hello"})), "ds", env=env, check=True)
    path = Path(run_cli("cache", "ds", env=env, check=True).stdout.strip())
    os.chmod(path / "x", 0o644)
    (path / "x").write_text("HELLO")
    damaged = run_cli("verify", "ds", env=env)
    assert damaged.returncode == 9 and "damaged  x" in damaged.stdout
    assert run_cli("verify", "ds", "--repair", env=env).returncode == 0
    assert (path / "x").read_text() == "hello"


def test_site_commands(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = local_env
    root = tmp_path / "nfs" / "cachehub"
    added = json.loads(
        run_cli("site", "add", "gpu-a", "--root", str(root), "--link", "copy", "--ttl", "12h", "--quota", "2T", "--json", env=env, check=True).stdout
    )
    assert added["name"] == "gpu-a" and added["root"] == str(root) and added["link"] == "copy"
    assert added["ttl"] == 12 * 3600 and added["quota"] == 2 * 1024**4 and added["grace"] == 600
    assert (root / "cachehub-site.json").exists()
    names = {s["name"] for s in json.loads(run_cli("site", "list", "--json", env=env, check=True).stdout)}
    assert names == {"local", "gpu-a"}
    run_cli("site", "set", "gpu-a", "--link", "symlink", "--quota", "0", "--min-free", "10%", env=env, check=True)
    shown = json.loads(run_cli("site", "show", "gpu-a", "--json", env=env, check=True).stdout)
    assert shown["link"] == "symlink" and shown["root"] == str(root)
    [listed] = [s for s in json.loads(run_cli("site", "list", "--json", env=env, check=True).stdout) if s["name"] == "gpu-a"]
    assert listed["quota"] is None and listed["min_free"] == 0.1 and listed["ttl"] == 12 * 3600
    bad = run_cli("site", "set", "gpu-a", "--ttl", "soon", env=env)
    assert bad.returncode == 13 and "invalid duration" in bad.stderr
    dup = run_cli("site", "add", "gpu-a", "--root", str(root), env=env)
    assert dup.returncode == ConflictError.exit_code
    # environment overrides never leak into config.toml
    config = (Path(env["CACHEHUB_HOME"]) / "config.toml").read_text()
    assert env["CACHEHUB_LAKE"] not in config and "gpu-a" in config


def test_catalog_rebuild_command(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = local_env
    run_cli("push", str(write_tree(tmp_path / "src", {"x": "1"})), "ds", "--tag", "v1", env=env, check=True)
    run_cli("cache", "ds@v1", env=env, check=True)
    before = run_cli("log", "ds", "--json", env=env, check=True).stdout
    catalog = Path(env["CACHEHUB_HOME"]) / "catalog.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(catalog) + suffix).unlink(missing_ok=True)
    counts = json.loads(run_cli("catalog", "rebuild", "--json", env=env, check=True).stdout)
    assert counts["datasets"] == 1 and counts["commits"] == 1 and counts["cache_entries"] == 1
    assert run_cli("log", "ds", "--json", env=env, check=True).stdout == before
    assert run_cli("path", "ds@v1", env=env).returncode == 0


def test_fast_path_command_matches_the_full_cli(tmp_path: Path, local_env: dict[str, str]) -> None:
    """``cachehub path`` skips Typer; it must answer exactly like the full command."""
    import subprocess
    import sys

    env = local_env
    run_cli("push", str(write_tree(tmp_path / "src", {"x": "1"})), "ds", "--tag", "v1", env=env, check=True)
    run_cli("cache", "ds@v1", env=env, check=True)
    run_cli("site", "add", "other", "--root", str(tmp_path / "other"), env=env, check=True)

    def entry(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cachehub.cli.entry", *args], capture_output=True, text=True, env=env)

    for args in (("path", "ds@v1"), ("path", "ds@v9"), ("path", "ds@v1", "--site", "other"), ("path", "ds@v1", "--site=local"), ("path", "nope")):
        fast, full = entry(*args), run_cli(*args, env=env)
        assert (fast.returncode, fast.stdout, fast.stderr) == (full.returncode, full.stdout, full.stderr), args
    assert entry("path", "--help").returncode == 0 and "Usage" in entry("path", "--help").stdout


def test_progress_off_a_terminal_is_plain_lines(local_env: dict[str, str], tmp_path: Path) -> None:
    """stderr is a pipe here: progress comes as plain lines (files, bytes, rate, ETA), one when
    a phase ends; -q and --json print none."""
    from .conftest import random_tree

    src = random_tree(tmp_path / "src", 200, seed=3, max_size=20_000)
    env = {**local_env, "CACHEHUB_PROGRESS_EVERY": "0"}
    pushed = run_cli("push", str(src), "ds", env=env, check=True)
    lines = [line for line in pushed.stderr.splitlines() if line.strip().startswith(("hash", "upload"))]
    assert any(re.search(r"upload\s+\d+/200 files\s+[\d.]+ \w+( of [\d.]+ \w+)?\s+[\d.]+ \w+/s\s+ETA \d+", line) for line in lines), pushed.stderr
    assert any("upload  done: 200 files" in line for line in lines)
    cached = run_cli("cache", "ds@latest", env=env, check=True)
    assert re.search(r"fetch\s+done: \d+ files", cached.stderr), cached.stderr
    quiet = run_cli("-q", "verify", "ds@latest", env=env, check=True)
    assert "files" not in quiet.stderr.replace("0 files", "")
    as_json = run_cli("verify", "ds@latest", "--json", env=env, check=True)
    assert json.loads(as_json.stdout)["ok"] and "done:" not in as_json.stderr


def test_daemon_logs_as_json_lines(local_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachehub.cli.main", "daemon", "--listen", "127.0.0.1:0", "--log-format", "json"],
        env=local_env, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = json.loads(proc.stderr.readline())  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first["level"] == "info" and first["logger"] == "cachehub.daemon" and "serving sites" in first["message"]
    assert first["time"].endswith("Z")
    bad = run_cli("daemon", "--log-format", "xml", env=local_env)
    assert bad.returncode == 13 and "--log-format must be text or json" in bad.stderr
