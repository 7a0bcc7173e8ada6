"""Files read back are data: tensors, numbers, strings and plain containers, never code.

Every ``.pt`` file the project reads (checkpoint state, best weights, cached
assets, exports) goes through ``load_data``: ``torch.load(weights_only=True)``,
whose unpickler builds only tensors and plain containers and refuses anything
else before it is called. A torch.distributed.checkpoint (DCP) directory has two
more pickles: its ``.metadata`` (read here by an unpickler that accepts only the
DCP record types, torch dtypes and sizes) and the non-tensor values of the state
(optimizer step counts, learning rates), read by ``SafeLoadPlanner`` with
``weights_only=True`` too.

A file that is not plain data raises ``NotDataError`` naming it; nothing in it
has run. ``data_problem`` checks a checkpoint directory that way without loading
its tensors (``mmap``), so a resume passes over such a checkpoint to the
previous valid one as it does for a corrupt one.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

DCP_METADATA = ".metadata"


class NotDataError(pickle.UnpicklingError):
    """A file read back holds something other than plain data (code to run); it was refused unread."""


def _refused(path: str | Path, detail: str) -> NotDataError:
    return NotDataError(f"{path}: refused, not plain data ({detail}); nothing in it was run")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # torch's weights-only error names the refused global on a line of its own
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln]
    return (named or lines or [type(e).__name__])[0][:300]


def load_data(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load`` of a file that must hold only tensors and plain containers (on the CPU)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refused(path, _first_line(e)) from None


def load_data_bytes(data: bytes | io.BytesIO, *, where: str) -> Any:
    buf = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    try:
        return torch.load(buf, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(where, _first_line(e)) from None


# --------------------------------------------------------------------------- DCP metadata

_DCP_TYPES = {
    "torch.distributed.checkpoint.metadata": {"BytesStorageMetadata", "ChunkStorageMetadata", "Metadata",
                                              "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the records DCP writes in ``.metadata`` and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_TYPES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) or value is torch.Size:
                return value
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")


def read_dcp_metadata(path: str | Path) -> Any:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise _refused(path, str(e)) from None


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by ``read_dcp_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        metadata = read_dcp_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner with the non-tensor values read as data (``weights_only=True``)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        # lazy: a private torch module (what DefaultLoadPlanner uses): a torch that moves it fails here, not at import
        from torch.distributed.checkpoint._traverse import set_element as _set

        data = load_data_bytes(value, where=f"DCP value {read_item.dest_index.fqn}")
        if self.flatten_state_dict:
            _set(self.original_state_dict, self.mappings[read_item.dest_index.fqn], data)
        else:
            self.state_dict[read_item.dest_index.fqn] = data


def _dcp_problem(shards: Path) -> str | None:
    meta = read_dcp_metadata(shards / DCP_METADATA)
    storage = getattr(meta, "storage_data", None) or {}
    for index, item in getattr(meta, "state_dict_metadata", {}).items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        for key, info in storage.items():
            if getattr(key, "fqn", None) != index:
                continue
            if info.transform_descriptors:
                continue  # a transformed value is checked when it is read (SafeLoadPlanner)
            with open(shards / info.relative_path, "rb") as f:
                f.seek(info.offset)
                load_data_bytes(f.read(info.length), where=f"{shards / info.relative_path} (value {index})")
    return None


def data_problem(ckpt_dir: str | Path) -> str | None:
    """None when every pickled file of a checkpoint directory is plain data; else which file is not and why.

    Tensors are not read (``.pt`` files are memory-mapped), so this costs little beside the checksums."""
    d = Path(ckpt_dir)
    try:
        for p in sorted(d.rglob("*.pt")):
            try:
                load_data(p, mmap=True)
            except (RuntimeError, zipfile.BadZipFile, EOFError) as e:  # not a torch zip file at all
                return f"{p.relative_to(d).as_posix()} does not load ({type(e).__name__}: {_first_line(e)})"
        for meta in sorted(d.rglob(DCP_METADATA)):
            _dcp_problem(meta.parent)
    except NotDataError as e:
        return str(e).replace(f"{d}/", "")
    return None
