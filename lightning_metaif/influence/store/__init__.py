"""Memory-mapped store of projected per-task gradients (TracIn / TracInCP checkpoints and trajectory segments).

:mod:`~lightning_metaif.influence.store.format` defines the self-describing file format;
:mod:`~lightning_metaif.influence.store.store` the :class:`GradientStore` directory, its writers and streaming reads.
TracIn over a store is :func:`lightning_metaif.influence.tracin.store_tracin`.
"""

from lightning_metaif.influence.store.format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    FileHeader,
    StoreChecksumError,
    StoreFormatError,
    read_header,
    verify_file,
)
from lightning_metaif.influence.store.lock import StoreLockedError
from lightning_metaif.influence.store.store import (
    FILE_SUFFIX,
    MANIFEST_NAME,
    TEMP_PREFIX,
    CheckpointInfo,
    CheckpointWriter,
    GradientStore,
    StoreReport,
    verify_store,
)
from lightning_metaif.influence.tracin import TracInResult

__all__ = [
    "FILE_SUFFIX",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MANIFEST_NAME",
    "TEMP_PREFIX",
    "CheckpointInfo",
    "CheckpointWriter",
    "FileHeader",
    "GradientStore",
    "StoreChecksumError",
    "StoreFormatError",
    "StoreLockedError",
    "StoreReport",
    "TracInResult",
    "read_header",
    "verify_file",
    "verify_store",
]
