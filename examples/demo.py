"""The quick-start demo on the embedded default: local lake, local site cache, no server.

    python examples/demo.py

It generates a small chest-X-ray-like PNG dataset, publishes three versions, shows the log
and a diff, caches v2 and then v3 (only the delta moves), and reads the data through
``cachehub.resolve()`` like a training script. State goes to ``examples/.demo-home`` (or
``$CACHEHUB_HOME`` if set), recreated on every run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_images import build  # noqa: E402


def sh(*args: str) -> str:
    print(f"\n$ cachehub {shlex.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "cachehub.cli.main", *args], text=True, capture_output=True)
    print(result.stdout.rstrip())
    if result.stderr.strip():
        print(result.stderr.rstrip())
    if result.returncode != 0:
        sys.exit(f"demo failed: cachehub {shlex.join(args)} exited {result.returncode}")
    return result.stdout


def main() -> None:
    home = Path(os.environ.get("CACHEHUB_HOME") or HERE / ".demo-home")
    if home.exists():
        shutil.rmtree(home, onerror=lambda f, p, e: (os.chmod(os.path.dirname(p), 0o755), f(p)))
    os.environ["CACHEHUB_HOME"] = str(home)
    for var in ("CACHEHUB_LAKE", "CACHEHUB_CONFIG", "CACHEHUB_SITE", "CACHEHUB_ENDPOINT_URL"):
        os.environ.pop(var, None)
    work = home / "work"

    sh("init")
    for version in (1, 2, 3):
        build(work / f"chest-xray-v{version}", version)
        sh("push", str(work / f"chest-xray-v{version}"), "chest-xray", "-m", f"export {version}", "--tag", f"v{version}")
    sh("push", str(work / "chest-xray-v3"), "chest-xray")  # unchanged: no new commit
    sh("datasets")
    sh("log", "chest-xray")
    sh("diff", "chest-xray@v1", "chest-xray@v2")
    sh("diff", "--stat", "chest-xray@v2", "chest-xray@v3")
    sh("cache", "chest-xray@v2")
    sh("cache", "chest-xray@v3")  # only the delta v2 -> v3 is fetched
    sh("status")

    print("\n# a training script reads through cachehub.resolve():")
    subprocess.run([sys.executable, str(HERE / "train.py"), "chest-xray@v3"], check=True)


if __name__ == "__main__":
    main()
