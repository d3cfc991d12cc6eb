"""The NATS JetStream object-store backend of the model registry (objects
``<name>/<version>/<file>``, the manifest written last). Separate from
:mod:`ganglion.models.registry` so that in-process users of the local registry never import
the NATS client."""

from __future__ import annotations

import asyncio

from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from ganglion.models.artifact import (
    MANIFEST,
    Artifact,
    CorruptArtifactError,
    Manifest,
    ModelError,
    ModelNotFoundError,
    parse_version,
)
from ganglion.models.registry import ModelRef

DEFAULT_BUCKET = "ganglion_models"


class NatsRegistry:
    """Artefacts as objects ``<name>/<version>/<file>`` in a JetStream object store bucket."""

    def __init__(self, js: JetStreamContext, bucket: str = DEFAULT_BUCKET) -> None:
        self.js = js
        self.bucket = bucket
        self.description = f"nats-object-store:{bucket}"
        self._store: ObjectStore | None = None
        self._lock = asyncio.Lock()

    async def store(self) -> ObjectStore:
        async with self._lock:
            if self._store is None:
                try:
                    self._store = await self.js.object_store(self.bucket)
                except (BucketNotFoundError, NotFoundError):
                    self._store = await self.js.create_object_store(
                        self.bucket, ObjectStoreConfig(bucket=self.bucket, storage=StorageType.FILE)
                    )
            return self._store

    async def versions(self, name: str | None = None) -> list[ModelRef]:
        store = await self.store()
        try:
            infos = await store.list(ignore_deletes=True)
        except NotFoundError:  # an empty bucket
            return []
        refs = set()
        for info in infos:
            parts = info.name.split("/")
            if len(parts) != 3 or parts[2] != MANIFEST or (name is not None and parts[0] != name):
                continue
            version = parse_version(parts[1])
            if version is not None:
                refs.add(ModelRef(parts[0], version))
        return sorted(refs)

    async def _get(self, key: str) -> bytes | None:
        store = await self.store()
        try:
            result = await store.get(key)
        except (ObjectNotFoundError, NotFoundError):
            return None
        return bytes(result.data or b"")

    async def fetch(self, ref: ModelRef) -> Artifact:
        text = await self._get(f"{ref.name}/{ref.version}/{MANIFEST}")
        if text is None:
            raise ModelNotFoundError(f"{ref} not found in {self.description}")
        manifest = Manifest.from_json(text, str(ref))
        if (manifest.name, manifest.version) != (ref.name, ref.version):
            raise CorruptArtifactError(f"{ref}: manifest says {manifest.ref}")
        files: dict[str, bytes] = {}
        for fname in manifest.files:
            data = await self._get(f"{ref.name}/{ref.version}/{fname}")
            if data is None:
                raise CorruptArtifactError(f"{ref}: object {fname} is missing")
            files[fname] = data
        return Artifact(manifest, files)

    async def publish(self, artifact: Artifact) -> ModelRef:
        m = artifact.manifest
        ref = ModelRef(m.name, m.version)
        if ref in await self.versions(m.name):
            raise ModelError(f"{m.ref} already exists in {self.description}")
        store = await self.store()
        for fname, data in artifact.files.items():
            await store.put(f"{m.name}/{m.version}/{fname}", data)
        await store.put(f"{m.name}/{m.version}/{MANIFEST}", m.to_json().encode())
        return ref

    async def put_raw(self, key: str, data: bytes) -> None:
        """Write one object as is (tests use it to plant a corrupt artefact)."""
        store = await self.store()
        await store.put(key, data)
