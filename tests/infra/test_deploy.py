"""Deployment side: manifests parse, deployments name real flows with valid schedules and
parameters, the YAML and Python definitions agree, and no manifest holds a secret.

Fast and offline: no Prefect server, no cluster, no network. Importing the flow modules
imports Prefect (a few seconds, once per session).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO / "infra" / "deploy"
MANIFESTS = sorted(p for p in DEPLOY_DIR.iterdir() if p.suffix in {".yaml", ".yml", ".json"})
TEXT_FILES = sorted(p for p in DEPLOY_DIR.iterdir() if p.is_file())
EXPECTED_FILES = ("README.md", "prefect.yaml", "kuberay-raycluster.yaml", "mlflow.yaml", "postgres.yaml", "Dockerfile",
                  "work-pool-base-job-template.json")
DEPLOYMENT_NAMES = ["ingest", "unimiss", "foundation"]

# Keys whose values are credentials; such a value must be a reference, never a literal.
SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth[_-]?string",
                        re.IGNORECASE)
REFERENCE = re.compile(r"""^(\$[A-Za-z_]\w*|\$\{[A-Za-z_]\w*\}|\$\([A-Za-z_]\w*\)|\{\{\s*prefect\.blocks\.secret\.[\w-]+\s*\}\}|<[^<>]+>)$""")
# In free text, keys are written as env vars (AWS_SECRET_ACCESS_KEY=) or YAML keys (password:); prose
# such as "Secrets: ..." is neither.
KEY_VALUE = re.compile(r"""([A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY)[A-Z0-9_]*"""
                       r"""|[a-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)[a-z0-9_.-]*)"""
                       r"""[ \t]*[:=][ \t]*("[^"\n]*"|'[^'\n]*'|[^\s,}\]]+)""")
URI_PASSWORD = re.compile(r"""[a-z][a-z0-9+.-]*://[^/\s:@'"]+:([^@\s/'"]+)@""")
KNOWN_TOKENS = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|pnu_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}")


# --------------------------------------------------------------------------- helpers


def load_all(path: Path) -> list[Any]:
    """Every YAML document of a file (JSON is YAML), empty documents dropped."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def documents(path: Path, kind: str) -> list[dict]:
    return [doc for doc in load_all(path) if isinstance(doc, dict) and doc.get("kind") == kind]


def one(path: Path, kind: str) -> dict:
    found = documents(path, kind)
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def prefect_yaml() -> dict:
    return load_all(DEPLOY_DIR / "prefect.yaml")[0]


def yaml_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in prefect_yaml()["deployments"]}


def flow_at(entrypoint: str):
    """The object an entrypoint ``path/to/file.py:function`` names (imported as a module of the repo)."""
    path, function = entrypoint.split(":")
    assert (REPO / path).is_file(), f"{entrypoint}: no file {path}"
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, function)


def assert_valid_cron(expr: str) -> None:
    """A five-field cron string that croniter (if installed) or Prefect's CronSchedule accepts."""
    assert len(expr.split()) == 5, expr
    try:
        from croniter import croniter
    except ImportError:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=expr, timezone="UTC")
    else:
        assert croniter.is_valid(expr), expr


def assert_parameters_accepted(flow: Any, parameters: dict[str, Any]) -> None:
    """Names bind to the flow's signature and values pass Prefect's own type validation."""
    from pipelines.cli import PROFILES

    inspect.signature(flow.fn).bind_partial(**parameters)
    flow.validate_parameters(parameters)
    if "profile" in parameters:
        assert parameters["profile"] in PROFILES


def containers(doc: dict) -> Iterator[dict]:
    """Every container of a workload document (pod templates at any depth)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from containers(item)


def literal_secrets(node: Any, where: str = "") -> list[str]:
    """Places in a parsed manifest where a credential-like key holds a literal value."""
    problems: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node and SECRET_KEY.search(node["name"]):
            problems.append(f"{where}: env {node['name']} has a literal value (use valueFrom.secretKeyRef)")
        for key, value in node.items():
            here = f"{where}.{key}"
            if isinstance(key, str) and SECRET_KEY.search(key) and isinstance(value, (str, int, float)) \
                    and not REFERENCE.match(str(value)):
                problems.append(f"{here}: literal value for a credential key")
            problems += literal_secrets(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            problems += literal_secrets(item, f"{where}[{i}]")
    return problems


def literal_secrets_in_text(text: str) -> list[str]:
    """Credential-looking literals in any text (Dockerfile, README, comments)."""
    problems = [f"known token format: {m.group(0)[:12]}..." for m in KNOWN_TOKENS.finditer(text)]
    for match in KEY_VALUE.finditer(text):
        value = match.group(2).strip("\"'")
        if value and not REFERENCE.match(value):
            problems.append(f"{match.group(1)} = {value!r}")
    for match in URI_PASSWORD.finditer(text):
        password = match.group(1)
        if not (REFERENCE.match(password) or re.fullmatch(r"[A-Z_]+", password)):
            problems.append(f"password inside a URI: {match.group(0)}")
    return problems


@pytest.fixture(scope="module")
def specs() -> list[dict]:
    from pipelines.deploy import deploy

    return deploy(dry_run=True)


# --------------------------------------------------------------------------- every file


def test_expected_files_exist():
    for name in EXPECTED_FILES:
        assert (DEPLOY_DIR / name).is_file(), name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses(path):
    assert load_all(path)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_holds_no_literal_secret(path):
    docs = load_all(path)
    assert not [d for d in docs if isinstance(d, dict) and d.get("kind") == "Secret"], \
        "Secret objects are created out of band, never committed"
    problems = [p for i, doc in enumerate(docs) for p in literal_secrets(doc, f"{path.name}[{i}]")]
    assert not problems, problems


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: p.name)
def test_file_text_holds_no_literal_secret(path):
    assert not literal_secrets_in_text(path.read_text()), path.name


def test_secret_checks_catch_literals():
    """The detectors above are not vacuous: literals are flagged, references are not."""
    leaky = yaml.safe_load_all(
        "env:\n  - {name: AWS_SECRET_ACCESS_KEY, value: not-a-real-key}\n---\n"
        "job_variables:\n  env: {PREFECT_API_KEY: also-fake, DB_PASSWORD: hunter2}\n")
    assert len([p for doc in leaky for p in literal_secrets(doc)]) == 3
    safe = yaml.safe_load(
        "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    valueFrom: {secretKeyRef: {name: s, key: k}}\n"
        "job_variables:\n  env: {DB_PASSWORD: '{{ prefect.blocks.secret.db-password }}'}\n")
    assert literal_secrets(safe) == []
    assert literal_secrets_in_text("password: hunter2\nuri: postgresql://u:hunter2@db:5432/x\n")
    assert literal_secrets_in_text("AWS_SECRET_ACCESS_KEY=hunter2")
    assert not literal_secrets_in_text('--from-literal=password="$DB_PASSWORD" postgresql://u:${DB_PASSWORD}@db/x')


# --------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_matches_prefects_schema():
    models = pytest.importorskip("prefect.cli.deploy._models")
    project = models.PrefectYamlModel.model_validate(prefect_yaml())
    assert [d.name for d in project.deployments] == DEPLOYMENT_NAMES


@pytest.mark.parametrize("name", DEPLOYMENT_NAMES)
def test_prefect_yaml_entrypoint_is_a_flow_of_the_same_name(name):
    from prefect import Flow

    flow = flow_at(yaml_deployments()[name]["entrypoint"])
    assert isinstance(flow, Flow)
    assert flow.name == name


@pytest.mark.parametrize("name", DEPLOYMENT_NAMES)
def test_prefect_yaml_schedule_and_parameters(name):
    deployment = yaml_deployments()[name]
    (schedule,) = deployment["schedules"]
    assert_valid_cron(schedule["cron"])
    assert schedule["timezone"] == "UTC"
    day_of_month, month, day_of_week = schedule["cron"].split()[2:]
    if name == "ingest":
        assert (day_of_month, month, day_of_week) == ("*", "*", "*"), "ingest runs nightly"
    else:
        assert day_of_week != "*" and day_of_month == "*", f"{name} runs weekly"
    assert set(deployment["parameters"]) == {"profile"}
    assert_parameters_accepted(flow_at(deployment["entrypoint"]), deployment["parameters"])


def test_prefect_yaml_work_pool_and_job_variables():
    for deployment in yaml_deployments().values():
        pool = deployment["work_pool"]
        assert pool["name"] == "medfoundry-k8s"
        variables = pool["job_variables"]
        assert variables["image"] == "{{ $MEDFOUNDRY_IMAGE }}"
        env = variables["env"]
        assert all(isinstance(v, str) for v in env.values()), "Kubernetes env values are strings"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["RAY_ADDRESS"] == "ray://medfoundry-ray-head:10001"
        assert env["MEDFOUNDRY_USE_GPU"] == "true"
        assert env["MEDFOUNDRY_STORE_URI"].startswith("s3://")
        assert env["MEDFOUNDRY_RAY_STORAGE_URI"].startswith("s3://")
        assert int(env["MEDFOUNDRY_NUM_WORKERS"]) >= 1


def test_prefect_yaml_pull_step_is_the_image_workdir():
    (step,) = prefect_yaml()["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert f"WORKDIR {directory}" in (DEPLOY_DIR / "Dockerfile").read_text()


def test_job_variables_are_declared_by_the_work_pool_template():
    template = json.loads((DEPLOY_DIR / "work-pool-base-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    for deployment in yaml_deployments().values():
        assert set(deployment["work_pool"]["job_variables"]) <= declared
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["env"] == "{{ env }}" and container["image"] == "{{ image }}"
    assert {"secretRef": {"name": "medfoundry-object-store"}} in container["envFrom"]


# --------------------------------------------------------------------------- pipelines/deploy.py


def test_dry_run_builds_every_deployment(specs):
    from prefect import Flow

    from pipelines.deploy import DEFAULT_WORK_POOL

    assert [s["name"] for s in specs] == DEPLOYMENT_NAMES
    for s in specs:
        assert_valid_cron(s["cron"])
        assert s["timezone"] == "UTC"
        flow = flow_at(s["entrypoint"])
        assert isinstance(flow, Flow) and flow.name == s["flow_name"] == s["name"]
        assert_parameters_accepted(flow, s["parameters"])
        assert s["work_pool"] == DEFAULT_WORK_POOL == "medfoundry-k8s"
        assert s["job_variables"]["env"]["MEDFOUNDRY_USE_GPU"] == "true"


def test_python_definitions_match_prefect_yaml(specs):
    """prefect.yaml and pipelines/deploy.py describe the same deployments (image aside)."""
    by_name = yaml_deployments()
    assert [s["name"] for s in specs] == list(by_name)
    for s in specs:
        d = by_name[s["name"]]
        (schedule,) = d["schedules"]
        assert (s["entrypoint"], s["cron"], s["timezone"]) == (d["entrypoint"], schedule["cron"], schedule["timezone"])
        assert (s["parameters"], s["tags"], s["description"]) == (d["parameters"], d["tags"], d["description"])
        assert (s["work_pool"], s["concurrency_limit"]) == (d["work_pool"]["name"], d["concurrency_limit"])
        python_vars = {k: v for k, v in s["job_variables"].items() if k != "image"}
        yaml_vars = {k: v for k, v in d["work_pool"]["job_variables"].items() if k != "image"}
        assert python_vars == yaml_vars


def test_dry_run_selects_names_and_image(monkeypatch):
    from pipelines.deploy import IMAGE_PLACEHOLDER, deploy

    monkeypatch.delenv("MEDFOUNDRY_IMAGE", raising=False)
    (only,) = deploy(["unimiss"], work_pool="other-pool", image="reg.example/medfoundry:1", dry_run=True)
    assert (only["name"], only["work_pool"], only["job_variables"]["image"]) == ("unimiss", "other-pool", "reg.example/medfoundry:1")
    assert deploy(["ingest"], dry_run=True)[0]["job_variables"]["image"] == IMAGE_PLACEHOLDER
    monkeypatch.setenv("MEDFOUNDRY_IMAGE", "reg.example/medfoundry:env")
    assert deploy(["ingest"], dry_run=True)[0]["job_variables"]["image"] == "reg.example/medfoundry:env"
    with pytest.raises(ValueError, match="known: ingest, unimiss, foundation"):
        deploy(["nope"], dry_run=True)


def test_dry_run_contacts_no_server(monkeypatch):
    import prefect
    import prefect.deployments.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("dry run must not contact the Prefect API")

    monkeypatch.setattr(prefect, "deploy", refuse)
    monkeypatch.setattr(runner, "get_client", refuse)
    from pipelines.deploy import deploy

    assert len(deploy(dry_run=True)) == len(DEPLOYMENT_NAMES)


def test_deploy_registers_with_the_existing_image(monkeypatch):
    import prefect

    calls: list[tuple[tuple, dict]] = []

    def fake_deploy(*deployments, **kwargs):
        calls.append((deployments, kwargs))
        return [uuid.uuid4() for _ in deployments]

    monkeypatch.setattr(prefect, "deploy", fake_deploy)
    from pipelines.deploy import deploy

    result = deploy(None, work_pool="pool-x", image="reg.example/medfoundry:2", dry_run=False)
    (deployments, kwargs), = calls
    assert kwargs == {"work_pool_name": "pool-x", "image": "reg.example/medfoundry:2", "build": False, "push": False,
                      "print_next_steps_message": False}
    assert [d.entrypoint for d in deployments] == [r["entrypoint"] for r in result]
    assert all(uuid.UUID(r["id"]) for r in result)


def test_deploy_refuses_the_placeholder_image_and_reports_failures(monkeypatch):
    import prefect

    monkeypatch.delenv("MEDFOUNDRY_IMAGE", raising=False)
    monkeypatch.setattr(prefect, "deploy", lambda *d, **k: [uuid.uuid4()])
    from pipelines.deploy import deploy

    with pytest.raises(ValueError, match="no image"):
        deploy(dry_run=False)
    with pytest.raises(RuntimeError, match="2 of 3 deployments failed"):
        deploy(image="reg.example/medfoundry:3", dry_run=False)


# --------------------------------------------------------------------------- Kubernetes manifests


def test_raycluster_has_cpu_head_and_autoscaled_gpu_workers():
    from pipelines.deploy import SHARED_ENV

    cluster = one(DEPLOY_DIR / "kuberay-raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"].startswith("ray.io/")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in containers(g))]
    assert gpu_groups, "at least one worker group with GPUs"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= int(SHARED_ENV["MEDFOUNDRY_NUM_WORKERS"]), "room for every Ray Train worker"
    for container in containers(spec):
        assert {"secretRef": {"name": "medfoundry-object-store"}} in container["envFrom"]


def test_ray_client_address_reaches_the_head():
    from pipelines.deploy import SHARED_ENV

    path = DEPLOY_DIR / "kuberay-raycluster.yaml"
    cluster = one(path, "RayCluster")
    address = urlparse(SHARED_ENV["RAY_ADDRESS"])
    (service,) = [s for s in documents(path, "Service") if s["metadata"]["name"] == address.hostname]
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert address.port in [p["port"] for p in service["spec"]["ports"]]


def test_ray_versions_match_everywhere():
    """Ray Client needs the same Ray on both ends: RayCluster, Dockerfile and the dev environment."""
    cluster = one(DEPLOY_DIR / "kuberay-raycluster.yaml", "RayCluster")
    dockerfile = (DEPLOY_DIR / "Dockerfile").read_text()
    (pinned,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert cluster["spec"]["rayVersion"] == pinned == importlib.metadata.version("ray")


def test_mlflow_server_uses_secret_backend_and_served_artifacts():
    from pipelines.deploy import SHARED_ENV

    path = DEPLOY_DIR / "mlflow.yaml"
    (container,) = containers(one(path, "Deployment"))
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:2] == ["mlflow", "server"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in command
    assert "--serve-artifacts" in command
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in command)
    (backend,) = [e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
    assert set(backend["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    tracking = urlparse(SHARED_ENV["MLFLOW_TRACKING_URI"])
    service = one(path, "Service")
    assert service["metadata"]["name"] == tracking.hostname
    assert tracking.port in [p["port"] for p in service["spec"]["ports"]]


def test_postgres_password_comes_from_a_secret():
    (container,) = containers(one(DEPLOY_DIR / "postgres.yaml", "StatefulSet"))
    (password,) = [e for e in container["env"] if e["name"] == "POSTGRES_PASSWORD"]
    assert "secretKeyRef" in password["valueFrom"]


def test_dockerfile_installs_torch_before_the_project():
    text = (DEPLOY_DIR / "Dockerfile").read_text()
    assert "python:3.11-slim" in text
    (pinned,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", text, re.MULTILINE)
    assert f"torch=={pinned}" in (REPO / "constraints.txt").read_text()
    assert text.index('"torch==${TORCH_VERSION}"') < text.index("pip install -c constraints.txt .")


# --------------------------------------------------------------------------- CLI


def test_cli_deploy_dry_run_prints_one_line_per_deployment(specs):
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["deploy", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert lines == [[s["name"], s["cron"], s["entrypoint"]] for s in specs]


def test_cli_deploy_unknown_name_exits_2():
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["deploy", "nope", "--dry-run"])
    assert result.exit_code == 2


def test_cli_deploy_default_work_pool_and_help_imports_no_engine():
    import typer.main

    from pipelines.cli import app
    from pipelines.deploy import DEFAULT_WORK_POOL

    command = typer.main.get_command(app).commands["deploy"]
    (work_pool,) = [p for p in command.params if p.name == "work_pool"]
    assert work_pool.default == DEFAULT_WORK_POOL
    heavy = ("torch", "ray", "prefect", "mlflow")
    code = ("import sys\nfrom pipelines.cli import app\ntry:\n    app(['deploy', '--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--dry-run" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
