"""The deployment files under deploy/: Kubernetes manifests, the Dockerfile, the Slurm scripts.

There is no cluster here, so the manifests are checked against the Kubernetes API schemas of
every minor version we support (``kubernetes-validate``, strict: unknown fields fail), and
against each other and cachehub itself: names that refer to each other exist, selectors match,
the configuration parses with cachehub's own loader, and every container's arguments parse
with the real command line. The Slurm scripts run for real, as array tasks, with ``srun``
replaced by a shim that runs its command (the only stand-in: Slurm itself is not installable
here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cachehub.shard import Shard

from .conftest import random_tree, tree_digest

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
SUPPORTED = [f"1.{minor}.0" for minor in range(29, 38)]  # Kubernetes 1.29 to 1.37 (docs/kubernetes.md)


def _docs(folder: str) -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted((K8S / folder).glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


SITE = _docs("site")
JOBS = _docs("jobs")


def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("folder", ["site", "jobs"])
def test_every_manifest_validates_against_the_kubernetes_schemas(folder: str) -> None:
    docs = _docs(folder)
    assert docs
    for (kind, name), doc in docs.items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a Prometheus Operator CRD, not in the Kubernetes schemas: checked below
        for version in SUPPORTED:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{kind}/{name} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}") from None


@pytest.mark.parametrize("folder", ["site", "jobs"])
def test_kustomization_lists_every_file(folder: str) -> None:
    kustomization = yaml.safe_load((K8S / folder / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in (K8S / folder).glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_the_site_manifests_refer_to_each_other() -> None:
    deployment = SITE[("Deployment", "cachehub-daemon")]
    pod = _pod(deployment)
    assert ("ServiceAccount", pod["serviceAccountName"]) in SITE
    account = SITE[("ServiceAccount", "cachehub")]
    assert account["automountServiceAccountToken"] is False  # least privilege: no API token at all
    assert not [k for k, _ in SITE if k in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["site"]["persistentVolumeClaim"]["claimName"]
    pvc = SITE[("PersistentVolumeClaim", claim)]
    pv = SITE[("PersistentVolume", pvc["spec"]["volumeName"])]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"] and "ReadWriteMany" in pv["spec"]["accessModes"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain" and "nfs" in pv["spec"]
    assert ("ConfigMap", volumes["config"]["configMap"]["name"]) in SITE
    [container] = pod["containers"]
    assert ("Secret", container["envFrom"][0]["secretRef"]["name"]) in SITE
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service = SITE[("Service", "cachehub-daemon")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = SITE[("ServiceMonitor", "cachehub-daemon")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_the_configuration_parses_and_names_the_mounted_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cachehub.config import load_settings

    text = SITE[("ConfigMap", "cachehub-config")]["data"]["config.toml"]
    tomllib.loads(text)
    (tmp_path / "config.toml").write_text(text)
    for var in ("CACHEHUB_LAKE", "CACHEHUB_SITE", "CACHEHUB_CONFIG", "CACHEHUB_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings(tmp_path)
    mounts = {m["name"]: m["mountPath"] for m in _pod(SITE[("Deployment", "cachehub-daemon")])["containers"][0]["volumeMounts"]}
    assert str(settings.site(settings.default_site).root) == mounts["site"]
    for job in JOBS.values():
        for c in _pod(job).get("initContainers", []) + _pod(job)["containers"]:
            assert any(m["mountPath"] == mounts["site"] for m in c["volumeMounts"])


def _parses(argv: list[str]) -> None:
    """Parse ``argv`` with the real command line, without running it."""
    import typer

    from cachehub.cli.main import app

    command = typer.main.get_command(app)
    sub = command.commands[argv[0]]  # type: ignore[attr-defined]
    sub.make_context(argv[0], list(argv[1:]))


def test_every_container_runs_a_real_cachehub_command() -> None:
    seen = 0
    for doc in [*SITE.values(), *JOBS.values()]:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = _pod(doc)
        for c in pod.get("initContainers", []) + pod["containers"]:
            argv = c.get("command", ["cachehub"])[1:] + c.get("args", []) if c.get("command", ["cachehub"])[0] == "cachehub" else None
            if argv is None:
                continue
            if "--" in argv:
                argv = argv[: argv.index("--")] + ["--", "true"]
            _parses(argv)
            seen += 1
    assert seen == 4  # daemon, shard, the init container, the trainer


def test_the_shard_job_derives_each_shard_from_its_index() -> None:
    job = JOBS[("Job", "cache-chest-xray-v3")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    env = {e["name"]: e["value"] for e in _pod(job)["containers"][0]["env"]}
    shards = [Shard.from_env({**env, "JOB_COMPLETION_INDEX": str(i)}) for i in range(spec["completions"])]
    assert [(s.index, s.count) for s in shards] == [(i, spec["completions"]) for i in range(spec["completions"])]  # type: ignore[union-attr]


def test_the_training_job_waits_and_reads_the_site_read_only() -> None:
    pod = _pod(JOBS[("Job", "train-resnet")])
    [init] = pod["initContainers"]
    assert "--wait" in init["args"] and "--shard" not in init["args"]
    [train] = pod["containers"]
    assert train["command"][:2] == ["cachehub", "run"] and "--use" in train["command"]  # a lease for the command's life
    mounts = {m["mountPath"]: m for m in train["volumeMounts"]}
    assert mounts["/mnt/cachehub"]["readOnly"] is True
    assert {m.get("subPath") for m in mounts.values() if not m.get("readOnly")} == {"leases", "used", None}  # only where readers record themselves, and the home


def test_the_dockerfile_build_stage_has_everything_the_package_needs(tmp_path: Path) -> None:
    """Copy exactly what deploy/Dockerfile's build stage copies, and build the wheel from it."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    build_stage = dockerfile.split("\nFROM ")[1]  # [0]: the comments above the first FROM
    copies = [line.split()[1:-1] for line in build_stage.splitlines() if line.startswith("COPY ")]
    context = tmp_path / "context"
    for sources in copies:
        for src in sources:
            target = context / src
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / src, target)
    out = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = out.glob("cachehub-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"cachehub/shard.py", "cachehub/cli/main.py", "cachehub/backends/s3.py", "cachehub/backends/azure.py"} <= names
    # the dashboard's templates and stylesheet ship in the package (sites are often offline)
    assert {"cachehub/web/templates/base.html", "cachehub/web/templates/commit.html", "cachehub/web/static/style.css"} <= names
    assert "USER 10001:10001" in dockerfile and 'ENTRYPOINT ["cachehub"]' in dockerfile
    uid = _pod(SITE[("Deployment", "cachehub-daemon")])["securityContext"]["runAsUser"]
    assert uid == 10001


# -- Slurm ------------------------------------------------------------------------------------
def _slurm_env(tmp_path: Path, lake: Path) -> dict[str, str]:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "srun").write_text('#!/bin/sh\nexec "$@"\n')  # stands in for Slurm's launcher
    (shim / "srun").chmod(0o755)
    (shim / "cachehub").write_text(f'#!/bin/sh\nexec {sys.executable} -m cachehub.cli.main "$@"\n')
    (shim / "cachehub").chmod(0o755)
    config = tmp_path / "config.toml"
    config.write_text(f'format_version = 1\n[lake]\nurl = "{lake}"\n')  # `site add` below adds the site
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEHUB_", "SLURM_"))}
    env.update(PATH=f"{shim}:{env['PATH']}", CACHEHUB_CONFIG=str(config), TMPDIR=str(tmp_path / "tmp"), SLURM_JOB_ID="4242")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def test_the_slurm_array_caches_a_commit_and_the_training_job_reads_it(tmp_path: Path) -> None:
    lake, root = tmp_path / "lake", tmp_path / "nfs" / "cachehub"
    env = _slurm_env(tmp_path, lake)
    src = random_tree(tmp_path / "src", 60, seed=4)
    home = {**env, "CACHEHUB_HOME": str(tmp_path / "pusher")}
    subprocess.run([sys.executable, "-m", "cachehub.cli.main", "site", "add", "gpu-a", "--root", str(root)], env=home, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "cachehub.cli.main", "push", str(src), "scans", "--tag", "v1"], env=home, check=True, capture_output=True)
    script = REPO / "deploy" / "slurm" / "cache-array.sbatch"
    tasks = [
        subprocess.Popen(
            ["bash", str(script), "scans@v1"],
            env={**env, "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in (1, 2, 3)  # --array=1-3
    ]
    outs = [t.communicate(timeout=300) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0, 0], [e for _, e in outs]
    assert {o.strip() for o, _ in outs} == {str(next((root / "commits").iterdir()))}  # every task waited for the publish
    assert sorted(e.split("(from")[0].strip().rsplit(" ", 1)[-1] for _, e in outs for e in e.splitlines() if "(from SLURM" in e) == ["0/3", "1/3", "2/3"]
    assert tree_digest(next((root / "commits").iterdir())) == tree_digest(src)

    train = subprocess.run(["bash", str(REPO / "deploy" / "slurm" / "train.sbatch"), "scans@v1"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert train.returncode == 0, train.stderr
    assert "training on scans@v1" in train.stdout
    events = json.loads(
        subprocess.run(
            [sys.executable, "-m", "cachehub.cli.main", "audit", "--action", "use", "--json"],
            env={**env, "CACHEHUB_HOME": str(tmp_path / "tmp" / "cachehub-4242")}, capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert [(e["dataset"], e["site"]) for e in events] == [("scans", "gpu-a")]  # one lease, held for the run


def test_monitoring_files_use_only_series_the_daemon_exports(local_env: dict[str, str]) -> None:
    """deploy/monitoring: the alert rules parse, and every cachehub_* series they and the Grafana
    dashboard query is one a daemon's /metrics has (parsed with prometheus_client)."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from cachehub import server
    from cachehub.config import load_settings
    from cachehub.daemon import Daemon

    exported = {f.name for f in text_string_to_metric_families(server.prometheus(Daemon(load_settings(), listen=None, watch=False).status()))}
    exported |= {"cachehub_lake_request_duration_seconds", "cachehub_lake_request_errors"}  # present once an object store was used

    def base(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum|info)$", "", name)

    rules = yaml.safe_load((REPO / "deploy" / "monitoring" / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} >= {"CachehubDaemonDown", "CachehubSiteNearlyFull", "CachehubSubscriptionFailing"}
    board = json.loads((REPO / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in board["panels"] for t in p["targets"]]
    used = {base(n) for e in exprs for n in re.findall(r"\bcachehub_[a-z_]+", e)}
    assert used and used <= exported, used - exported
