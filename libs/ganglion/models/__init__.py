"""Versioned model artefacts and the registries that hold them (a directory here, a NATS
JetStream object store in :mod:`ganglion.models.nats_registry`). Cheap to import: no torch,
no NATS client."""

from ganglion.models.artifact import (
    MANIFEST,
    MAX_VERSION,
    Artifact,
    CorruptArtifactError,
    Manifest,
    ModelError,
    ModelKind,
    ModelNotFoundError,
    SchemaMismatchError,
    build,
    parse_version,
    verify,
)
from ganglion.models.registry import (
    MODELS_DIR_ENV,
    SHIPPED,
    LayeredRegistry,
    LocalRegistry,
    ModelRef,
    Registry,
    default_registry,
    publish_next,
)

__all__ = [
    "MANIFEST",
    "MAX_VERSION",
    "MODELS_DIR_ENV",
    "SHIPPED",
    "Artifact",
    "CorruptArtifactError",
    "LayeredRegistry",
    "LocalRegistry",
    "Manifest",
    "ModelError",
    "ModelKind",
    "ModelNotFoundError",
    "ModelRef",
    "Registry",
    "SchemaMismatchError",
    "build",
    "default_registry",
    "parse_version",
    "publish_next",
    "verify",
]
