"""Model artefacts, registries (directory and NATS object store) and serving learned policies
over real gRPC: aliases, canary, shadow, rollback, pinning, refusal, hot swap under load.

The models here are untrained networks (tiny, built in the test): what is tested is the
artefact and serving machinery, not their quality.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from ganglion import rpc
from ganglion.bus import ENV_NATS_URL, NatsServer, connect
from ganglion.convert import job_to_proto, state_to_proto
from ganglion.domain import ClusterState, Job, Segment
from ganglion.models import (
    Artifact,
    CorruptArtifactError,
    LocalRegistry,
    ModelRef,
    SchemaMismatchError,
    verify,
)
from ganglion.models.nats_registry import NatsRegistry
from ganglion.rl.decide import ActionForm
from ganglion.rl.features import observe, pad
from ganglion.rl.model import EXPECTED_SCHEMA, WEIGHTS, ScoringModel, to_artifact
from ganglion.rl.network import NetConfig, SchedulerNet
from ganglion.v1 import decision_pb2, decision_pb2_grpc
from ganglion_decision import DecisionConfig, serve

TIMEOUT_S = 30.0  # a server with a models dir imports torch and loads a model before ready


def tiny_artifact(version: int, seed: int = 0) -> Artifact:
    torch.manual_seed(seed)
    net = SchedulerNet(NetConfig(hidden=8))
    return to_artifact(
        net,
        version=version,
        form=ActionForm.RANK,
        k=16,
        quantum_s=300.0,
        training={"algo": "none", "seed": seed},
        evaluation={"avg_jct_ratio": 1.0},
    )


def cluster() -> ClusterState:
    running = [Job("r0", "a", 2, 0.0, attained_service_s=7200.0)]
    return ClusterState.build(100.0, {"h1": 4, "h2": 4}, {"r0": [Segment("h1", (0, 1))]}, running)


def pending() -> list[Job]:
    return [Job(f"j{i}", "ab"[i % 2], 1 + i % 3, float(i)) for i in range(6)]


def schedule_request(policy: str) -> decision_pb2.ScheduleRequest:
    return decision_pb2.ScheduleRequest(
        cluster=state_to_proto(cluster()),
        pending=[job_to_proto(j) for j in pending()],
        policy=policy,
    )


# -- artefacts and the directory registry ------------------------------------------------------


def test_artifact_round_trip_scores_like_the_trained_network(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = SchedulerNet(NetConfig(hidden=8))
    artifact = to_artifact(net, form=ActionForm.RANK, k=16, quantum_s=120.0, training={"seed": 3})
    registry = LocalRegistry(tmp_path)
    assert registry.publish_sync(artifact) == ModelRef("scheduler", 1)
    loaded = registry.fetch_sync(ModelRef("scheduler", 1))
    assert loaded.manifest.files[WEIGHTS] == artifact.manifest.files[WEIGHTS]
    assert loaded.manifest.training["seed"] == 3
    model = ScoringModel(loaded)
    assert (model.k, model.quantum_s, model.form) == (16, 120.0, ActionForm.RANK)
    x, mask = pad(observe(cluster(), pending(), 16), 16)
    with torch.inference_mode():
        want = net.scores(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    got, _ = model.score(x[None], mask[None])
    np.testing.assert_allclose(got[0][mask], want[mask], rtol=1e-6)
    assert registry.next_version("scheduler") == 2


def test_corrupt_or_mismatched_artifact_is_refused(tmp_path: Path) -> None:
    good = tiny_artifact(1)
    flipped = bytearray(good.files[WEIGHTS])
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(CorruptArtifactError, match="sha256"):
        verify(Artifact(good.manifest, {WEIGHTS: bytes(flipped)}), EXPECTED_SCHEMA)
    with pytest.raises(CorruptArtifactError, match="missing"):
        verify(Artifact(good.manifest, {}), EXPECTED_SCHEMA)
    other = dataclasses.replace(good.manifest, schema_version=999)
    with pytest.raises(SchemaMismatchError, match="schema v999"):
        ScoringModel(Artifact(other, good.files))
    renamed = dataclasses.replace(good.manifest, features=("a", "b"))
    with pytest.raises(SchemaMismatchError, match="feature names"):
        verify(Artifact(renamed, good.files), EXPECTED_SCHEMA)
    # On disk: a truncated manifest is refused with the version named.
    registry = LocalRegistry(tmp_path)
    registry.publish_sync(good)
    (tmp_path / "scheduler" / "1" / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptArtifactError, match="scheduler@1"):
        registry.fetch_sync(ModelRef("scheduler", 1))


async def test_nats_object_store_registry_round_trip(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url, "test-models")
    try:
        registry = NatsRegistry(nc.jetstream(), "test_models")
        assert await asyncio.wait_for(registry.versions(), TIMEOUT_S) == []
        for v in (1, 2):
            await asyncio.wait_for(registry.publish(tiny_artifact(v, seed=v)), TIMEOUT_S)
        refs = await asyncio.wait_for(registry.versions("scheduler"), TIMEOUT_S)
        assert refs == [ModelRef("scheduler", 1), ModelRef("scheduler", 2)]
        fetched = await asyncio.wait_for(registry.fetch(refs[1]), TIMEOUT_S)
        verify(fetched, EXPECTED_SCHEMA)
        assert fetched.files[WEIGHTS] == tiny_artifact(2, seed=2).files[WEIGHTS]
        # A corrupt object under a new version is refused on verification.
        bad = tiny_artifact(3, seed=3)
        await asyncio.wait_for(registry.put_raw("scheduler/3/weights.pt", b"garbage"), TIMEOUT_S)
        await asyncio.wait_for(
            registry.put_raw("scheduler/3/manifest.json", bad.manifest.to_json().encode()),
            TIMEOUT_S,
        )
        planted = await asyncio.wait_for(registry.fetch(ModelRef("scheduler", 3)), TIMEOUT_S)
        with pytest.raises(CorruptArtifactError):
            verify(planted, EXPECTED_SCHEMA)
    finally:
        await nc.close()


# -- serving over real gRPC ------------------------------------------------------------------


async def start(config: DecisionConfig) -> tuple[str, asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop, ready=port.set_result))
    either: list[asyncio.Future[Any]] = [task, port]
    done, _ = await asyncio.wait(either, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert port in done, "server did not become ready"
    return f"127.0.0.1:{port.result()}", stop, task


@pytest.fixture
async def served(
    tmp_path: Path,
) -> AsyncIterator[tuple[decision_pb2_grpc.DecisionServiceAsyncStub, LocalRegistry]]:
    registry = LocalRegistry(tmp_path / "models")
    registry.publish_sync(tiny_artifact(1, seed=1))
    registry.publish_sync(tiny_artifact(2, seed=2))
    address, stop, task = await start(
        DecisionConfig(port=0, models_dir=str(registry.root), models_poll_s=0.1)
    )
    try:
        async with rpc.channel(address) as channel:
            yield decision_pb2_grpc.DecisionServiceStub(channel), registry
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)


async def versions_of(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub, policy: str, n: int
) -> set[str]:
    replies = await asyncio.gather(
        *(stub.Schedule(schedule_request(policy), timeout=TIMEOUT_S) for _ in range(n))
    )
    return {r.version for r in replies}


async def listing(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub,
) -> decision_pb2.ListModelsResponse:
    return await stub.ListModels(decision_pb2.ListModelsRequest(), timeout=TIMEOUT_S)


async def wait_for(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub, check: Any
) -> decision_pb2.ListModelsResponse:
    for _ in range(100):  # bounded: 100 x 0.1 s
        models = await listing(stub)
        if check(models):
            return models
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met; last listing: {models}")


async def test_aliases_canary_shadow_pin_and_rollback(served: Any) -> None:
    stub, registry = served
    models = await listing(stub)
    assert list(models.available) == [1, 2]
    assert {m.version: list(m.aliases) for m in models.loaded} == {2: ["stable"]}
    assert await versions_of(stub, "rl", 3) == {"scheduler@2"}
    # A request may pin a version (loaded on demand); the response names who decided.
    assert await versions_of(stub, "rl:1", 2) == {"scheduler@1"}
    # Canary with the whole share: every unpinned request goes to it.
    await stub.SetAlias(
        decision_pb2.SetAliasRequest(alias="canary", version=1, share=1.0), timeout=TIMEOUT_S
    )
    assert await versions_of(stub, "rl", 3) == {"scheduler@1"}
    assert await versions_of(stub, "rl:stable", 1) == {"scheduler@2"}
    await stub.SetAlias(decision_pb2.SetAliasRequest(alias="canary", version=0), timeout=TIMEOUT_S)
    # Shadow: scores the same requests, changes nothing, records agreement.
    await stub.SetAlias(decision_pb2.SetAliasRequest(alias="shadow", version=1), timeout=TIMEOUT_S)
    assert await versions_of(stub, "rl", 4) == {"scheduler@2"}
    models = await wait_for(stub, lambda m: any(v.shadow_requests >= 4 for v in m.loaded))
    shadow = next(v for v in models.loaded if v.version == 1)
    assert "shadow" in shadow.aliases and 0.0 <= shadow.shadow_agreement <= 1.0
    assert models.shadow_log and models.shadow_log[-1].shadow_version == 1
    # Per-version metrics.
    stable = next(v for v in models.loaded if v.version == 2)
    assert stable.requests >= 8 and stable.errors == 0 and stable.mean_latency_s > 0
    # Rollback to 1 sticks while a newer version appears (auto-promotion stops).
    await stub.SetAlias(decision_pb2.SetAliasRequest(alias="stable", version=1), timeout=TIMEOUT_S)
    registry.publish_sync(tiny_artifact(3, seed=3))
    models = await wait_for(stub, lambda m: any(v.version == 3 for v in m.loaded))
    assert not models.auto_promote
    assert await versions_of(stub, "rl", 2) == {"scheduler@1"}
    # Unknown version: NOT_FOUND; unloading the stable version: FAILED_PRECONDITION.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Schedule(schedule_request("rl:99"), timeout=TIMEOUT_S)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UnloadModel(decision_pb2.UnloadModelRequest(version=1), timeout=TIMEOUT_S)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    await stub.UnloadModel(decision_pb2.UnloadModelRequest(version=3), timeout=TIMEOUT_S)
    assert 3 not in {v.version for v in (await listing(stub)).loaded}


async def test_corrupt_version_is_refused_and_stable_stays(served: Any) -> None:
    stub, registry = served
    bad = tiny_artifact(3, seed=3)
    registry.publish_sync(Artifact(bad.manifest, {WEIGHTS: b"not the weights"}))
    models = await wait_for(stub, lambda m: any(r.version == 3 for r in m.refused))
    assert "sha256" in next(r.reason for r in models.refused if r.version == 3)
    assert await versions_of(stub, "rl", 2) == {"scheduler@2"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.LoadModel(decision_pb2.LoadModelRequest(version=3), timeout=TIMEOUT_S)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "refused" in (err.value.details() or "")


async def test_hot_swap_under_concurrent_load_fails_no_request(served: Any) -> None:
    stub, registry = served
    seen: set[str] = set()
    failures: list[BaseException] = []

    async def client() -> None:
        for _ in range(60):  # bounded
            try:
                reply = await stub.Schedule(schedule_request("rl"), timeout=TIMEOUT_S)
                seen.add(reply.version)
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
            if "scheduler@3" in seen and len(seen) >= 2:
                return

    async def publisher() -> None:
        await asyncio.sleep(0.2)
        registry.publish_sync(tiny_artifact(3, seed=3))

    await asyncio.wait_for(asyncio.gather(publisher(), *(client() for _ in range(8))), 60.0)
    assert failures == []
    assert {"scheduler@2", "scheduler@3"} <= seen


async def test_service_with_nats_object_store_registry(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await connect(nats_server.url, "test-publisher")
    try:
        registry = NatsRegistry(nc.jetstream(), "served_models")
        await asyncio.wait_for(registry.publish(tiny_artifact(1, seed=1)), TIMEOUT_S)
        monkeypatch.setenv(ENV_NATS_URL, nats_server.url)
        address, stop, task = await start(
            DecisionConfig(port=0, models_nats_bucket="served_models", models_poll_s=0.1)
        )
        try:
            async with rpc.channel(address) as channel:
                stub = decision_pb2_grpc.DecisionServiceStub(channel)
                assert await versions_of(stub, "rl", 2) == {"scheduler@1"}
                await asyncio.wait_for(registry.publish(tiny_artifact(2, seed=2)), TIMEOUT_S)
                models = await wait_for(
                    stub, lambda m: any("stable" in v.aliases and v.version == 2 for v in m.loaded)
                )
                assert models.registry == "nats-object-store:served_models"
                assert await versions_of(stub, "rl", 2) == {"scheduler@2"}
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT_S)
    finally:
        await nc.close()


@pytest.mark.parametrize(
    "argv", [["load", "-1"], ["unload", "4294967296"], ["alias", "canary", "x"]]
)
def test_models_cli_rejects_versions_outside_uint32(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from ganglion.cli import main

    with pytest.raises(SystemExit) as done:
        main(["models", *argv])
    assert done.value.code == 2
    assert "argument version:" in capsys.readouterr().err


async def test_a_learned_default_policy_with_no_version_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ganglion_decision.models import open_models

    caplog.set_level(logging.WARNING, logger="ganglion_decision.models")
    handle = await asyncio.wait_for(
        open_models(str(tmp_path / "none"), poll_s=0, default_policy="rl"), 30
    )
    await asyncio.wait_for(handle.close(), 30)
    [record] = [r for r in caplog.records if "no model version" in r.getMessage()]
    assert getattr(record, "policy", None) == "rl"


# -- version names, refusals, unloading and workers ----------------------------------------


def test_version_names_are_ascii_digits_within_uint32(tmp_path: Path) -> None:
    from ganglion.models import MAX_VERSION, ModelError, parse_version

    assert [parse_version(t) for t in ("1", "42", str(MAX_VERSION))] == [1, 42, MAX_VERSION]
    for text in ("", "0", "01", "-1", "1.5", " 1", "²", "\u0661", str(MAX_VERSION + 1)):
        assert parse_version(text) is None, text
    with pytest.raises(ModelError, match="from 1 to"):
        dataclasses.replace(tiny_artifact(1).manifest, version=MAX_VERSION + 1)
    # Folders that only look like versions are not listed (a "²" made int() raise, and a
    # version past uint32 broke ListModels).
    registry = LocalRegistry(tmp_path)
    registry.publish_sync(tiny_artifact(1))
    manifest = (tmp_path / "scheduler" / "1" / "manifest.json").read_bytes()
    for name in ("²", "0", "01", str(MAX_VERSION + 1)):
        (tmp_path / "scheduler" / name).mkdir()
        (tmp_path / "scheduler" / name / "manifest.json").write_bytes(manifest)
    assert registry.versions_sync("scheduler") == [ModelRef("scheduler", 1)]


async def test_unloading_a_version_still_answers_the_requests_it_was_scoring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from ganglion.rl.serving import InferenceBatcher

    model = ScoringModel(tiny_artifact(1))
    real = model.score

    def slow(x: Any, mask: Any, value: bool = False) -> Any:
        time.sleep(0.3)  # in the batcher's worker thread: the pass is under way at close()
        return real(x, mask, value)

    monkeypatch.setattr(model, "score", slow)
    batcher = InferenceBatcher(model, passes=1)
    x, mask = pad(observe(cluster(), pending(), model.k), model.k)
    calls = [asyncio.create_task(batcher.score(x, mask)) for _ in range(3)]
    await asyncio.sleep(0.1)  # the first pass has taken the queued calls
    more = asyncio.create_task(batcher.score(x, mask))  # queued behind that pass
    await asyncio.wait_for(batcher.close(), TIMEOUT_S)
    scores = await asyncio.wait_for(asyncio.gather(*calls, more), TIMEOUT_S)
    assert all(s.shape == (model.k,) for s in scores)


async def test_policy_names_that_are_not_a_version_are_refused(served: Any) -> None:
    stub, _ = served
    for policy in ("rl:", "rl:0", "rl:01", "rl:\u0661", "rl:4294967296"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Schedule(schedule_request(policy), timeout=TIMEOUT_S)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, policy
        assert "rl:VERSION" in (err.value.details() or "")
    # rl:0 used to load the newest version as a side effect of failing.
    assert {m.version for m in (await listing(stub)).loaded} == {2}


async def test_a_refused_version_is_tried_again_and_promoted_once_whole(served: Any) -> None:
    stub, registry = served
    good = tiny_artifact(3, seed=3)
    # A copy still under way: the manifest is there, the weights not yet whole.
    registry.publish_sync(Artifact(good.manifest, {WEIGHTS: good.files[WEIGHTS][:100]}))
    await wait_for(stub, lambda m: any(r.version == 3 for r in m.refused))
    (registry.root / "scheduler" / "3" / WEIGHTS).write_bytes(good.files[WEIGHTS])
    models = await wait_for(
        stub, lambda m: any(v.version == 3 and "stable" in v.aliases for v in m.loaded)
    )
    assert not any(r.version == 3 for r in models.refused)
    assert await versions_of(stub, "rl", 2) == {"scheduler@3"}


async def test_a_registry_that_cannot_be_read_at_first_is_read_again(tmp_path: Path) -> None:
    from ganglion.models import ModelError
    from ganglion_decision.models import ModelManager

    class FailsOnce(LocalRegistry):
        failed = False

        def versions_sync(self, name: str | None = None) -> list[ModelRef]:
            if not self.failed:
                self.failed = True
                raise ModelError(f"cannot list {self.description}: Permission denied")
            return super().versions_sync(name)

    registry = FailsOnce(tmp_path)
    registry.publish_sync(tiny_artifact(1))
    manager = ModelManager(registry, poll_s=0)
    try:
        with pytest.raises(ModelError, match="Permission denied"):
            await asyncio.wait_for(manager.route("rl"), TIMEOUT_S)
        loaded = await asyncio.wait_for(manager.route("rl"), TIMEOUT_S)
        assert loaded.ref == ModelRef("scheduler", 1)
    finally:
        await asyncio.wait_for(manager.close(), TIMEOUT_S)


async def test_workers_refuse_admin_calls_that_would_change_one_of_them(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "models")
    registry.publish_sync(tiny_artifact(1, seed=1))
    address, stop, task = await start(
        DecisionConfig(port=0, models_dir=str(registry.root), reuse_port=True)
    )
    try:
        async with rpc.channel(address) as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            assert [m.version for m in (await listing(stub)).loaded] == [1]
            for call in (
                stub.SetAlias(decision_pb2.SetAliasRequest(alias="stable", version=1)),
                stub.LoadModel(decision_pb2.LoadModelRequest(version=1)),
                stub.UnloadModel(decision_pb2.UnloadModelRequest(version=1)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(call, TIMEOUT_S)
                assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                assert "--workers" in (err.value.details() or "")
            assert await versions_of(stub, "rl", 2) == {"scheduler@1"}
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)


def test_models_publish_refuses_what_a_server_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ganglion.cli import main

    def publish() -> int | str | None:
        with pytest.raises(SystemExit) as done:
            main(["models", "publish", str(folder), "--to-dir", str(out)])
        return done.value.code

    folder = tmp_path / "artifact"
    folder.mkdir()
    good = tiny_artifact(1)
    (folder / "manifest.json").write_text(good.manifest.to_json())
    (folder / WEIGHTS).write_bytes(good.files[WEIGHTS][:100])  # truncated
    out = tmp_path / "registry"
    assert publish() == 1
    assert "does not match its sha256" in capsys.readouterr().err
    (folder / WEIGHTS).unlink()  # missing
    assert publish() == 1
    assert "is missing" in capsys.readouterr().err
    (folder / "manifest.json").write_text('{"format": 1')  # unreadable: one line, no traceback
    assert publish() == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert LocalRegistry(out).versions_sync() == []
    (folder / "manifest.json").write_text(good.manifest.to_json())
    (folder / WEIGHTS).write_bytes(good.files[WEIGHTS])
    assert publish() == 0
    assert LocalRegistry(out).versions_sync() == [ModelRef("scheduler", 1)]


async def test_a_pick_form_shadow_scores_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import ganglion.policies.rl as rl_policy
    from ganglion_decision.models import ModelManager

    torch.manual_seed(5)
    pick = to_artifact(
        SchedulerNet(NetConfig(hidden=8)),
        version=2,
        form=ActionForm.PICK,
        k=16,
        quantum_s=300.0,
        training={"algo": "none"},
    )
    registry = LocalRegistry(tmp_path)
    registry.publish_sync(tiny_artifact(1))
    registry.publish_sync(pick)
    threads: dict[str, int] = {}
    real = rl_policy.decide_with

    def recording(model: Any, *args: Any, **kwargs: Any) -> Any:
        threads[str(model.ref)] = threading.get_ident()
        return real(model, *args, **kwargs)

    monkeypatch.setattr(rl_policy, "decide_with", recording)
    manager = ModelManager(registry, poll_s=0)
    try:
        await asyncio.wait_for(manager.start(), TIMEOUT_S)
        await asyncio.wait_for(manager.load(1), TIMEOUT_S)
        manager.set_alias("stable", 1)
        manager.set_alias("shadow", 2)
        await asyncio.wait_for(manager.decide("rl", cluster(), pending()), TIMEOUT_S)
        for _ in range(100):  # bounded: the comparison runs after the reply
            if manager.loaded[2].stats.shadow_requests:
                break
            await asyncio.sleep(0.05)
        assert manager.loaded[2].stats.shadow_requests == 1
        assert threads["scheduler@2"] != threading.get_ident()  # not on the event loop
    finally:
        await asyncio.wait_for(manager.close(), TIMEOUT_S)
