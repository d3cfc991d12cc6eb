"""Model admin RPCs (``ListModels``, ``LoadModel``, ``SetAlias``, ``UnloadModel``) and the
``Schedule`` path of learned policies: proto <-> the model manager, errors -> status codes.

A mixin of :class:`ganglion_decision.servicer.DecisionServicer`; ``self.models`` is the
:class:`~ganglion_decision.models.ModelManager` (None: no learned models on this server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from ganglion import policies
from ganglion.convert import decision_to_proto
from ganglion.models import (
    CorruptArtifactError,
    ModelError,
    ModelNotFoundError,
    SchemaMismatchError,
)
from ganglion.v1 import decision_pb2
from ganglion_decision.models import ModelManager, ModelStateError
from ganglion_decision.validation import Limits, parse_schedule_request

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]


def model_status_for(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status of a model error, or None when ``exc`` is not one."""
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, CorruptArtifactError | SchemaMismatchError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"refused: {exc}"
    if isinstance(exc, ModelStateError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ModelError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return None


class ModelAdminServicer:
    """See the module docstring."""

    models: ModelManager | None
    shared_port: bool
    """Other server processes listen on this port (``--workers``, ``--reuse-port``): state
    changes are refused, since a call reaches one of them."""
    _limits: Limits

    def known_policy_names(self) -> set[str]:
        names = set(policies.names())
        if self.models is not None:
            names |= self.models.known_names()
        return names

    def routes_to_models(self, name: str) -> bool:
        return self.models is not None and self.models.handles(name)

    async def schedule_learned(
        self, request: decision_pb2.ScheduleRequest, name: str
    ) -> decision_pb2.ScheduleResponse:
        """Validate and decide with the model manager. Raises; see :func:`model_status_for`."""
        assert self.models is not None
        # Any rl:* name passes here: the manager answers NOT_FOUND for a version it cannot
        # find and INVALID_ARGUMENT for a malformed name, naming the versions it has.
        state, pending = parse_schedule_request(
            request, self.known_policy_names() | {name}, self._limits
        )
        decision = await self.models.decide(name, state, pending)
        return decision_to_proto(decision)

    async def _manager(self, context: Context) -> ModelManager:
        if self.models is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "no model registry on this server"
            )
        assert self.models is not None
        await self.models.start()
        return self.models

    async def _changeable(self, context: Context) -> ModelManager:
        """The manager, for an RPC that changes what is loaded or aliased."""
        if self.shared_port:
            # Each process has its own manager, and a call reaches the one its connection
            # landed on: a rollback would apply to some requests and not others.
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server shares its port with other processes (--workers, --reuse-port), "
                "each with its own loaded models and aliases, and this call would change one: "
                "publish new versions to the registry instead (every worker loads and "
                "promotes them), or run learned models with --workers 1 to load, alias or "
                "unload by hand",
            )
        return await self._manager(context)

    async def _check_name(self, name: str, manager: ModelManager, context: Context) -> None:
        if name and name != manager.name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {name!r}; this server serves {manager.name!r}",
            )

    def _status(self, manager: ModelManager, version: int) -> decision_pb2.ModelVersionStatus:
        loaded = manager.loaded[version]
        m = loaded.model.manifest
        s = loaded.stats
        training, evaluation = manager.manifest_json(version)
        return decision_pb2.ModelVersionStatus(
            name=m.name,
            version=m.version,
            kind=m.kind.value,
            schema_version=m.schema_version,
            sha256=m.digest,
            aliases=manager.aliases_of(version),
            canary_share=manager.canary_share if manager.canary == version else 0.0,
            loaded_at_s=loaded.loaded_at,
            requests=s.requests,
            errors=s.errors,
            mean_latency_s=s.total_s / s.requests if s.requests else 0.0,
            max_latency_s=s.max_s,
            shadow_requests=s.shadow_requests,
            shadow_agreement=s.shadow_agreed / s.shadow_requests if s.shadow_requests else 0.0,
            training_json=training,
            evaluation_json=evaluation,
        )

    def _all(self, manager: ModelManager) -> list[decision_pb2.ModelVersionStatus]:
        return [self._status(manager, v) for v in sorted(manager.loaded)]

    async def ListModels(
        self, request: decision_pb2.ListModelsRequest, context: Context
    ) -> decision_pb2.ListModelsResponse:
        manager = await self._manager(context)
        await self._check_name(request.name, manager, context)
        return decision_pb2.ListModelsResponse(
            loaded=self._all(manager),
            available=manager.available,
            refused=[
                decision_pb2.RefusedVersion(name=manager.name, version=v, reason=r)
                for v, r in sorted(manager.refused.items())
            ],
            registry=manager.registry.description,
            auto_promote=manager.auto_promote,
            shadow_log=[
                decision_pb2.ShadowRecord(
                    time_s=e.time_s,
                    stable_version=e.stable,
                    shadow_version=e.shadow,
                    agreed=e.agreed,
                    stable_placed=list(e.stable_placed),
                    shadow_placed=list(e.shadow_placed),
                )
                for e in manager.shadow_log
            ],
        )

    async def LoadModel(
        self, request: decision_pb2.LoadModelRequest, context: Context
    ) -> decision_pb2.LoadModelResponse:
        manager = await self._changeable(context)
        await self._check_name(request.name, manager, context)
        try:
            loaded = await manager.load(request.version)
        except Exception as exc:
            await _abort(context, exc)
        return decision_pb2.LoadModelResponse(model=self._status(manager, loaded.ref.version))

    async def SetAlias(
        self, request: decision_pb2.SetAliasRequest, context: Context
    ) -> decision_pb2.SetAliasResponse:
        manager = await self._changeable(context)
        await self._check_name(request.name, manager, context)
        try:
            manager.set_alias(request.alias, request.version, request.share, request.auto_promote)
        except Exception as exc:
            await _abort(context, exc)
        return decision_pb2.SetAliasResponse(models=self._all(manager))

    async def UnloadModel(
        self, request: decision_pb2.UnloadModelRequest, context: Context
    ) -> decision_pb2.UnloadModelResponse:
        manager = await self._changeable(context)
        await self._check_name(request.name, manager, context)
        try:
            await manager.unload(request.version)
        except Exception as exc:
            await _abort(context, exc)
        return decision_pb2.UnloadModelResponse()


async def _abort(context: Context, exc: Exception) -> None:
    mapped = model_status_for(exc)
    if mapped is None:
        raise exc
    await context.abort(*mapped)
