"""docker-compose.yml cannot run here (no Docker engine), so its shape is checked instead."""

from __future__ import annotations

from pathlib import Path

import click
import typer.main
import yaml

from gemma_batch.cli import app

COMPOSE = Path(__file__).parents[1] / "docker-compose.yml"


def _is_cli_command(argv: list[str]) -> bool:
    """True when argv names a real `gemma-batch` subcommand and the options it takes."""
    assert argv[0] == "gemma-batch"
    command: click.Command = typer.main.get_command(app)
    args = argv[1:]
    while isinstance(command, click.Group):
        command = command.commands[args.pop(0)]
    ctx = command.make_context("gemma-batch", list(args), resilient_parsing=False)
    return ctx.command is command


def test_services_and_commands() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) >= {
        "redis",
        "postgres",
        "migrate",
        "prepare",
        "api",
        "worker-gpu0",
        "flower",
    }
    assert "--appendonly" in services["redis"]["command"]
    for name, service in services.items():
        if service.get("image") == "gemma-batch:latest":
            assert _is_cli_command(list(service["command"])), name
    worker = services["worker-gpu0"]
    assert worker["command"][-2:] == ["--gpus", "0"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["device_ids"] == ["0"]
    assert services["migrate"]["command"] == ["gemma-batch", "db", "upgrade"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
