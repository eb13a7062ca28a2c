"""docker-compose.yml cannot run here (no Docker engine): it is validated against the Compose
Specification's JSON Schema, and every command is checked against the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest
import typer.main
import yaml
from jsonschema import Draft7Validator

from gemma_batch.cli import app

COMPOSE = Path(__file__).parents[1] / "docker-compose.yml"
SCHEMA_CACHE = Path.home() / ".cache" / "gemma-batch" / "test-data" / "compose_spec.json"


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, object]:
    """The Compose Specification schema, as the docker-compose package ships it."""
    if not SCHEMA_CACHE.exists():
        folder = SCHEMA_CACHE.parent
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "docker-compose==1.29.2",
             "-d", str(folder)],
            check=True, timeout=300,
        )  # fmt: skip
        (wheel,) = folder.glob("docker_compose-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            SCHEMA_CACHE.write_bytes(archive.read("compose/config/compose_spec.json"))
    return json.loads(SCHEMA_CACHE.read_text())


def _is_cli_command(argv: list[str]) -> bool:
    """True when argv names a real `gemma-batch` subcommand and the options it takes."""
    assert argv[0] == "gemma-batch"
    command: click.Command = typer.main.get_command(app)
    args = argv[1:]
    while isinstance(command, click.Group):
        command = command.commands[args.pop(0)]
    ctx = command.make_context("gemma-batch", list(args), resilient_parsing=False)
    return ctx.command is command


def test_compose_file_follows_the_specification(compose_schema: dict[str, object]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    errors = sorted(Draft7Validator(compose_schema).iter_errors(compose), key=str)
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_services_commands_and_exposure() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    expected = {
        "redis",
        "postgres",
        "migrate",
        "prepare",
        "api",
        "worker-gpu0",
        "worker-cpu",
        "flower",
    }
    assert set(services) == expected
    for name, service in services.items():
        if str(service.get("image")).startswith("gemma-batch-"):
            assert _is_cli_command(list(service["command"])), name
            assert "${REDIS_PASSWORD" in service["environment"]["GEMMA_BATCH_BROKER_URL"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "--requirepass" in redis["command"]
    assert "ports" not in redis and "ports" not in services["postgres"]
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"api": ["8000:8000"], "flower": ["127.0.0.1:5555:5555"]}
    assert "GEMMA_BATCH_FLOWER_AUTH" in services["flower"]["environment"]

    gpu, cpu = services["worker-gpu0"], services["worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["command"][-2:] == ["--gpus", "0"] and cpu["command"][-2:] == ["--device", "cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["device_ids"] == ["0"]
    assert "deploy" not in cpu
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # The API side runs the torch-free image; what loads or converts a model, the worker image.
    targets = {name: s["build"]["target"] for name, s in services.items() if "build" in s}
    assert targets == {
        "migrate": "api",
        "api": "api",
        "flower": "api",
        "prepare": "worker",
        "worker-gpu0": "worker",
        "worker-cpu": "worker",
    }


def test_the_api_image_installs_no_torch() -> None:
    stages: dict[str, list[str]] = {}
    for line in (COMPOSE.parent / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            stages[line.split()[-1]] = current = []
        elif line.strip() and not line.startswith("#"):
            current.append(line)
    assert set(stages) == {"source", "api", "worker"}
    assert 'RUN pip install --no-cache-dir ".[api]"' in stages["api"]
    assert not [line for line in stages["api"] + stages["source"] if "torch" in line]
    assert 'RUN pip install --no-cache-dir ".[worker]"' in stages["worker"]
