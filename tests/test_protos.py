"""The committed generated stubs match protos/ (run `make protos` when this fails)."""

from __future__ import annotations

from ganglion import protogen


def test_generated_stubs_are_fresh() -> None:
    stale = protogen.stale_files()
    assert stale == [], f"stale generated stubs, run `make protos`: {stale}"


def test_services_follow_buf_standard_names() -> None:
    from ganglion.v1 import controller_pb2, decision_pb2, executor_pb2

    for module in (controller_pb2, decision_pb2, executor_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            assert service.name.endswith("Service"), service.name
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request", method.full_name
                assert method.output_type.name == f"{method.name}Response", method.full_name
