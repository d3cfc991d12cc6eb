"""Content-addressed blob cache of one host: eviction policies (S3-FIFO, LRU, ARC), per-tenant
budgets, SHARDS miss-ratio curves and the on-disk store; Belady OPT for reference."""

from ganglion.cache.errors import (
    BlobBusyError,
    BlobNotFoundError,
    BudgetError,
    CacheError,
    IntegrityError,
    InvalidBlobIdError,
    UnknownEvictionPolicyError,
)
from ganglion.cache.opt import belady_misses, load_trace
from ganglion.cache.partition import Counters, Partition, PartitionSnapshot, simulate
from ganglion.cache.policies import (
    ARC,
    DEFAULT_EVICTION,
    LRU,
    S3FIFO,
    EvictionPolicy,
    create_eviction_policy,
    eviction_policy_names,
)
from ganglion.cache.shards import EMPTY_CURVE, MissRatioCurve, Shards
from ganglion.cache.store import (
    SHARED,
    BlobReader,
    BlobStore,
    BlobWriter,
    CacheSnapshot,
    TenantSnapshot,
    blob_id_of,
    check_blob_id,
)

__all__ = [
    "ARC",
    "DEFAULT_EVICTION",
    "EMPTY_CURVE",
    "LRU",
    "S3FIFO",
    "SHARED",
    "BlobBusyError",
    "BlobNotFoundError",
    "BlobReader",
    "BlobStore",
    "BlobWriter",
    "BudgetError",
    "CacheError",
    "CacheSnapshot",
    "Counters",
    "EvictionPolicy",
    "IntegrityError",
    "InvalidBlobIdError",
    "MissRatioCurve",
    "Partition",
    "PartitionSnapshot",
    "Shards",
    "TenantSnapshot",
    "UnknownEvictionPolicyError",
    "belady_misses",
    "blob_id_of",
    "check_blob_id",
    "create_eviction_policy",
    "eviction_policy_names",
    "load_trace",
    "simulate",
]
