"""docker-compose.yml and the Dockerfile stay valid (Docker itself does not run here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ganglion_controller.config import parse_args as controller_args
from ganglion_decision.config import DecisionConfig
from ganglion_executor.config import parse_args as executor_args
from ganglion_sensing.config import parse_args as sensing_args

ROOT = Path(__file__).resolve().parents[1]

PARSERS: dict[str, Callable[[list[str]], Any]] = {
    "ganglion-controller": controller_args,
    "ganglion-decision": lambda argv: DecisionConfig.from_args(argv, {}),
    "ganglion-executor": executor_args,
    "ganglion-sensing": sensing_args,
}


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_every_service_with_nats_and_tracing() -> None:
    services = compose()["services"]
    commands = {
        s["command"][0]
        for s in services.values()
        if "command" in s and s.get("image") == "ganglion:dev"
    }
    assert commands == set(PARSERS)
    for name, svc in services.items():
        if svc.get("image") == "ganglion:dev":
            env = svc["environment"]
            assert env["GANGLION_NATS_URL"] == "nats://nats:4222", name
            assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf", name
            assert env["OTEL_SERVICE_NAME"] == svc["command"][0], name
    assert "--jetstream" in services["nats"]["command"]


@pytest.mark.parametrize("service", ["decision", "controller", "executor", "sensing"])
def test_compose_commands_are_accepted_by_the_services(service: str) -> None:
    command = compose()["services"][service]["command"]
    PARSERS[command[0]](command[1:])  # argparse exits (SystemExit) on a bad flag


def test_dockerfile_installs_the_project_and_its_sources() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for path in ("pyproject.toml", "libs", "services", "protos"):
        assert f"COPY {path}" in text or f"COPY {path} " in text, path
    assert "pip install ." in text
