"""On-disk storage of curvature fits: one folder per (backend, key).

An entry ``<directory>/<backend-name>-<key[:16]>/`` holds

* ``tensors.safetensors`` — the tensors of the backend's ``state_dict()`` (eigenpairs,
  Kronecker factors …), written with :mod:`safetensors`, bit for bit;
* ``manifest.json`` — the full key, the backend name and fit settings, the parts of the
  fingerprint, the sha256 and size of the tensor file, the library/torch versions, the
  creation time and the non-tensor part of the state (scalars, diagnostics).

Entries are written atomically: everything goes into a temporary folder next to the target,
which is then renamed into place; temporary folders left by a killed writer are removed when
a cache is opened. On load the manifest is parsed, the key and backend checked, the tensor
file's size and sha256 compared with the manifest and the file opened with safetensors; any
failure emits a :class:`CacheWarning` naming the file, and the caller recomputes (and
overwrites the bad entry).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..curvature import CurvatureBackend
from ..files import file_sha256, remove_debris, replace_folder, temporary_folder
from ..operators import CurvatureOperator
from .fingerprint import FORMAT_VERSION, backend_parts, library_versions

TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"


class CacheWarning(UserWarning):
    """A cache entry was unreadable (corrupt, truncated, tampered or from another format) and is recomputed."""


# ---------------------------------------------------------------------------------------------- (de)serialisation
def _split(state: Any, tensors: dict[str, Tensor], path: str) -> Any:
    """Replace tensors in a nested state by ``{"__tensor__": name}`` and collect them."""
    if isinstance(state, Tensor):
        t = state.detach()
        # Keep the memory layout (eigh returns column-major eigenvectors, and BLAS rounds differently on
        # another layout): store the permutation of dimensions in which the tensor is contiguous.
        order = sorted(range(t.ndim), key=lambda d: (-t.stride(d), d))
        stored = t.permute(order)
        if not stored.is_contiguous():
            order, stored = list(range(t.ndim)), t.contiguous()
        if stored.storage_offset() or stored.untyped_storage().nbytes() != stored.numel() * stored.element_size():
            stored = stored.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared storage
        tensors[path] = stored
        if order != list(range(t.ndim)):
            return {"__tensor__": path, "permutation": order}
        return {"__tensor__": path}
    if isinstance(state, dict):
        return {str(k): _split(v, tensors, f"{path}.{k}" if path else str(k)) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(state)]
    return _jsonable(state)


def _join(meta: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(meta, dict):
        if set(meta) == {"__tensor__"}:
            return tensors[meta["__tensor__"]]
        if set(meta) == {"__tensor__", "permutation"}:  # undo the permutation made in _split
            order = meta["permutation"]
            inverse = sorted(range(len(order)), key=lambda d: order[d])
            return tensors[meta["__tensor__"]].permute(inverse)
        return {k: _join(v, tensors) for k, v in meta.items()}
    if isinstance(meta, list):
        return [_join(v, tensors) for v in meta]
    return meta


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalars
        return _jsonable(v.item())
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    return repr(v)


def _unjson(meta: Any) -> Any:
    if isinstance(meta, dict):
        if set(meta) == {"__float__"}:
            return float(meta["__float__"])
        return {k: _unjson(v) for k, v in meta.items()}
    if isinstance(meta, list):
        return [_unjson(v) for v in meta]
    return meta


class CurvatureCache:
    """A folder of cached curvature fits, one sub-folder per (backend, key).

    >>> cache = CurvatureCache("~/.cache/hbt")
    >>> key = fingerprint(objective, backend, operator.settings())
    >>> if not cache.load(key, backend, operator):
    ...     backend.fit(operator)
    ...     cache.save(key, backend)

    Opening a cache removes temporary folders left in it by writers that were killed.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.hits = 0
        self.misses = 0
        self.removed_debris = remove_debris(self.directory)

    def entry(self, key: str, backend: CurvatureBackend | str) -> Path:
        """The folder of the entry for ``key`` and ``backend``."""
        name = backend if isinstance(backend, str) else backend.name
        return self.directory / f"{name}-{key[:16]}"

    # -------------------------------------------------------------------------------------- load
    def _reject(self, path: Path, why: str) -> bool:
        warnings.warn(f"curvature cache: {path} {why}; ignoring the cached entry and recomputing.",
                      CacheWarning, stacklevel=3)
        self.misses += 1
        return False

    def load(self, key: str, backend: CurvatureBackend, operator: CurvatureOperator) -> bool:
        """Restore ``backend`` from the entry for ``key``; ``True`` if loaded.

        ``False`` (recompute) when there is no entry, or, with a :class:`CacheWarning` naming
        the file, when the manifest or tensor file is unreadable, truncated, fails its
        checksum, or belongs to another key, backend or format.
        """
        folder = self.entry(key, backend)
        manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
        if not folder.is_dir():
            self.misses += 1
            return False
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            record = manifest["files"][TENSORS_FILE]
            stored_key, stored_backend, fmt = manifest["key"], manifest["backend"], manifest["format"]
            state_meta = manifest["state"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return self._reject(manifest_path, f"is missing or corrupt ({type(err).__name__}: {err})")
        if fmt != FORMAT_VERSION:
            return self._reject(manifest_path, f"has cache format {fmt!r}, this library writes {FORMAT_VERSION}")
        if stored_key != key or stored_backend != backend.name:
            return self._reject(manifest_path, f"belongs to key {str(stored_key)[:16]}… of backend "
                                               f"{stored_backend!r}, not {key[:16]}… of {backend.name!r}")
        try:
            size = tensors_path.stat().st_size
            if size != record["bytes"]:
                return self._reject(tensors_path, f"has {size} bytes, the manifest records {record['bytes']} "
                                                  "(truncated or partially written)")
            digest = file_sha256(tensors_path)
        except (OSError, KeyError, TypeError) as err:
            return self._reject(tensors_path, f"cannot be read ({type(err).__name__}: {err})")
        if digest != record.get("sha256"):
            return self._reject(tensors_path, f"fails its checksum (sha256 {digest[:16]}…, manifest "
                                              f"{str(record.get('sha256'))[:16]}…)")
        try:
            from safetensors import safe_open

            tensors = {}
            with safe_open(str(tensors_path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    # A fresh (aligned, owned) copy on the operator's device: BLAS results depend on the
                    # alignment of the data, and bit-for-bit equality with a fresh fit is the contract.
                    t = f.get_tensor(name)
                    tensors[name] = t.to(operator.device, copy=True)
        except Exception as err:  # safetensors raises its own SafetensorError and others
            return self._reject(tensors_path, f"cannot be opened by safetensors ({type(err).__name__}: {err})")
        try:
            state = _join(_unjson(state_meta), tensors)
            backend.load_state_dict(state, operator)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            backend._operator = None  # leave it unfitted; fit() recomputes everything
            return self._reject(folder, f"does not match this backend ({type(err).__name__}: {err})")
        backend.diagnostics = {**backend.diagnostics, "cache": {"loaded": str(folder)}}
        self.hits += 1
        return True

    # -------------------------------------------------------------------------------------- save
    def save(self, key: str, backend: CurvatureBackend, parts: dict | None = None) -> Path:
        """Write the fitted ``backend`` under ``key`` atomically; return the entry folder.

        ``parts`` (from :func:`fingerprint_parts`) is stored in the manifest for inspection.
        """
        from safetensors.torch import save_file

        if not backend.fitted:
            raise ValueError(f"the {backend.name!r} backend is not fitted; nothing to cache.")
        state = backend.state_dict()
        tensors: dict[str, Tensor] = {}
        meta = _split(state, tensors, "")
        target = self.entry(key, backend)
        tmp = temporary_folder(self.directory, target.name)
        try:
            tensors_path = tmp / TENSORS_FILE
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tensors_path),
                      metadata={"format": str(FORMAT_VERSION), "key": key, "backend": backend.name})
            manifest = {
                "format": FORMAT_VERSION,
                "key": key,
                "backend": backend.name,
                "backend_class": backend_parts(backend)["class"],
                "settings": backend_parts(backend)["settings"],
                "fingerprint": parts,
                "files": {TENSORS_FILE: {"sha256": file_sha256(tensors_path),
                                         "bytes": tensors_path.stat().st_size}},
                "state": meta,
                "library": library_versions(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            }
            with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=True, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
            replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target
