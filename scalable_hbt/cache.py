"""On-disk cache of curvature fits (DESIGN §2, layer 5: "computes the curvature once and
caches it to disk keyed by a fingerprint of model, data and settings").

An entry is one folder ``<directory>/<backend-name>-<key[:16]>/`` holding

* ``tensors.safetensors`` — the backend's fitted tensors (eigenpairs, Kronecker factors …),
  written with :mod:`safetensors`, bit for bit;
* ``manifest.json`` — the full key, the backend name and settings, the parts of the
  fingerprint, the sha256 and size of the tensor file, the library/torch versions, the
  creation time and the backend's non-tensor state (scalars, diagnostics).

The key (:func:`fingerprint`) is the sha256 of a canonical JSON document that holds the
bytes of θ̃ (and of buffers and frozen parameters), the model's structure, a hash of every
training input and target streamed chunk by chunk (never all in memory), the loss, weight
decay, dtype, device, batch size, the backend's name and constructor settings, and any
``extra`` settings of the caller (the damping request, the HVP mode). Any change gives a
different key, so a stale entry is never reused.

Entries are written atomically: everything goes into a temporary folder next to the
target, which is then renamed into place. On load the manifest is parsed, the key and
backend checked, the tensor file's size and sha256 compared with the manifest and the file
opened with safetensors; any failure emits a :class:`CacheWarning` naming the file, and
the caller recomputes (and overwrites the bad entry).

Which backends can be cached, and how, is a small protocol: a backend class may define
``state_dict() -> dict`` (tensors and JSON-able scalars) and ``load_state_dict(state,
hessian)``; for the built-in backends (dense, lanczos, lowrank, kfac, ekfac, lissa, cg)
the equivalent adapters live in this module (:data:`ADAPTERS`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .curvature import (CGCurvature, CurvatureBackend, DenseCurvature, KFACCurvature, LanczosCurvature,
                        LiSSACurvature)
from .hessian import HessianOperator
from .objective import Objective

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
_HASH_CHUNK_BYTES = 1 << 24
# Constructor arguments that do not change what a backend computes.
_IGNORED_SETTINGS = frozenset({"progress"})

State = dict[str, Any]  # values: Tensor | None | bool | int | float | str | list | dict


class CacheWarning(UserWarning):
    """A cache entry was unreadable (corrupt, truncated, tampered or from another format) and is recomputed."""


class UncacheableError(TypeError):
    """The backend (or one of its settings, e.g. a preconditioner given as a plain function) cannot be cached."""


# ---------------------------------------------------------------------------------------------- hashing
def _tensor_digest(t: Tensor, h: Any | None = None) -> Any:
    """Feed the raw bytes of ``t`` into hash ``h`` (a new sha256 if ``None``), in ≤16 MiB slices."""
    h = hashlib.sha256() if h is None else h
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return h
    step = max(1, _HASH_CHUNK_BYTES // flat.element_size())
    for i in range(0, flat.numel(), step):
        piece = flat[i:i + step].cpu().contiguous()
        h.update(piece.view(torch.uint8).numpy())  # bytes view: works for every dtype (bf16, bool …)
    return h


def _tensor_summary(t: Tensor) -> dict:
    return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": _tensor_digest(t).hexdigest()}


def _code_digest(fn: Any) -> str:
    """Best-effort identity of a Python callable: module, qualified name and compiled code."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    parts = [getattr(fn, "__module__", None) or type(fn).__module__,
             getattr(fn, "__qualname__", None) or type(fn).__qualname__]
    if code is not None:
        parts.append(_code_text(code))
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()


def _code_text(code: Any) -> str:
    """Bytecode, names and constants of a code object, nested code objects (lambdas, comprehensions)
    included by content, so the text is the same in every process (no memory addresses)."""
    consts = [_code_text(c) if hasattr(c, "co_code") else repr(c) for c in code.co_consts]
    return "|".join([code.co_code.hex(), repr(code.co_names), "(" + ",".join(consts) + ")"])


def data_digest(objective: Objective) -> dict:
    """sha256 of all training inputs and of all targets, streamed chunk by chunk through
    ``objective.train`` (one chunk in memory at a time; independent of the chunk size)."""
    hx, hy = hashlib.sha256(), hashlib.sha256()
    x_meta: tuple | None = None
    y_meta: tuple | None = None
    n = 0
    for batch in objective.train.batches(objective.batch_size):
        x = batch.x if isinstance(batch.x, Tensor) else torch.as_tensor(batch.x)
        x_meta = x_meta or (str(x.dtype), list(x.shape[1:]))
        _tensor_digest(x, hx)
        if batch.y is not None:
            y = batch.y if isinstance(batch.y, Tensor) else torch.as_tensor(batch.y)
            y_meta = y_meta or (str(y.dtype), list(y.shape[1:]))
            _tensor_digest(y, hy)
        n += len(batch)
    return {"n": n, "inputs": {"meta": x_meta, "sha256": hx.hexdigest()},
            "targets": {"meta": y_meta, "sha256": hy.hexdigest()}}


def _model_digest(objective: Objective) -> dict:
    """θ̃, buffers/frozen parameters and the model's structure (module types, repr, forward code)."""
    model = objective.model
    classes = sorted({type(m) for m in model.modules()}, key=lambda c: (c.__module__, c.__qualname__))
    return {
        "theta": _tensor_summary(objective.theta),
        "param_names": list(objective.param_names),
        "param_shapes": [list(s) for s in objective.param_shapes],
        "buffers": {k: _tensor_summary(b) for k, b in sorted(objective.buffers.items())},
        "repr": repr(model),
        "forward_code": {f"{c.__module__}.{c.__qualname__}": _code_digest(c.forward) for c in classes},
    }


def _canonical(value: Any, where: str) -> Any:
    """A JSON-able, exact representation of a setting (floats by repr, tensors by hash)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, Tensor):
        return _tensor_summary(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, CurvatureBackend):
        return {"backend": value.name, "class": _qualname(type(value)), "settings": backend_settings(value)}
    raise UncacheableError(f"setting {where} = {value!r} ({type(value).__name__}) cannot be fingerprinted; "
                           "pass plain numbers/strings (a preconditioner as a backend instance, not a function) "
                           "or do not use the curvature cache for this backend.")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def backend_settings(backend: CurvatureBackend) -> dict:
    """The backend's constructor settings: every ``__init__`` argument read back from the
    attribute of the same name (``progress`` ignored), or ``backend.cache_settings()``."""
    custom = getattr(backend, "cache_settings", None)
    if callable(custom):
        return _canonical(dict(custom()), f"{backend.name}.cache_settings()")
    out = {}
    sig = inspect.signature(type(backend).__init__)
    for pname, p in sig.parameters.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or pname in _IGNORED_SETTINGS:
            continue
        if not hasattr(backend, pname):
            raise UncacheableError(
                f"backend {backend.name!r}: constructor argument {pname!r} is not readable as an attribute, so "
                "its settings cannot be fingerprinted; store it as self.{pname} or define cache_settings().")
        out[pname] = _canonical(getattr(backend, pname), f"{backend.name}.{pname}")
    return out


def fingerprint_parts(objective: Objective, backend: CurvatureBackend, extra: dict | None = None) -> dict:
    """Everything the cache key is made of (stored in the manifest for inspection)."""
    loss = objective.loss
    return {
        "format": FORMAT_VERSION,
        "objective": _canonical(objective.fingerprint_parts(), "objective"),
        "batch_size": objective.batch_size,
        "loss": {"name": loss.name, "classification": loss.classification, "code": _code_digest(loss.fn)},
        "model": _model_digest(objective),
        "data": data_digest(objective),
        "backend": {"name": backend.name, "class": _qualname(type(backend)), "settings": backend_settings(backend)},
        "extra": _canonical(dict(extra or {}), "extra"),
    }


def _key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(objective: Objective, backend: CurvatureBackend, extra: dict | None = None) -> str:
    """sha256 (hex) of θ̃, model structure, training data, loss, weight decay, dtype, device,
    batch size, backend name and settings, and ``extra`` (e.g. ``{"damping": 0.2}``).

    Raises :class:`UncacheableError` when a setting cannot be fingerprinted (see :func:`cacheable`).
    """
    return _key_of(fingerprint_parts(objective, backend, extra))


# ---------------------------------------------------------------------------------------------- state adapters
def _diag(backend: CurvatureBackend) -> dict:
    return dict(backend.diagnostics)


def _dense_export(b: DenseCurvature) -> State:
    return {"eigenvalues": b.eigenvalues, "eigenvectors": b.eigenvectors, "diagnostics": _diag(b)}


def _dense_import(b: DenseCurvature, s: State, hessian: HessianOperator) -> None:
    M = hessian.shape[0]
    _expect(s["eigenvalues"], (M,), "eigenvalues")
    _expect(s["eigenvectors"], (M, M), "eigenvectors")
    b.eigenvalues, b.eigenvectors = s["eigenvalues"], s["eigenvectors"]
    b.diagnostics = dict(s["diagnostics"])
    b._hessian = hessian


def _lanczos_export(b: LanczosCurvature) -> State:
    return {"values": b.values, "vectors": b.vectors, "diagnostics": _diag(b)}


def _lanczos_import(b: LanczosCurvature, s: State, hessian: HessianOperator) -> None:
    if s["values"] is None or s["vectors"] is None:
        raise ValueError("no eigenpairs stored")
    m = s["values"].numel()
    _expect(s["vectors"], (hessian.shape[0], m), "vectors")
    b.values, b.vectors = s["values"], s["vectors"]
    b.diagnostics = dict(s["diagnostics"])
    b._hessian = hessian


_LAYER_TENSORS = ("QA", "QG", "lamA", "lamG", "S")


def _kfac_export(b: KFACCurvature) -> State:
    state: State = {"weight_decay": b.weight_decay, "diag_index": b.diag_index, "diag": b.diag,
                    "diag_names": list(b.diag_names), "diagnostics": _diag(b),
                    "layers": [{"name": l.name, "kind": l.kind, "out": l.out, "d_in": l.d_in} for l in b.layers]}
    for i, layer in enumerate(b.layers):
        for t in _LAYER_TENSORS:
            state[f"layer{i}.{t}"] = getattr(layer, t)
    return state


def _kfac_import(b: KFACCurvature, s: State, hessian: HessianOperator) -> None:
    b._recording = False
    b._discover(hessian.objective)  # module references and flat ranges (re-emits the fallback warning)
    found = [{"name": l.name, "kind": l.kind, "out": l.out, "d_in": l.d_in} for l in b.layers]
    if found != s["layers"]:
        raise ValueError(f"layer layout differs: stored {s['layers']}, model has {found}")
    if not torch.equal(s["diag_index"].to(b.diag_index.device), b.diag_index):
        raise ValueError("fallback parameter indices differ")
    for i, layer in enumerate(b.layers):
        for t in _LAYER_TENSORS:
            setattr(layer, t, s[f"layer{i}.{t}"])
        _expect(layer.S, (layer.out, layer.d_in), f"layer{i}.S")
    b.diag = s["diag"]
    b.diag_names = list(s["diag_names"])
    b.weight_decay = float(s["weight_decay"])
    b.diagnostics = dict(s["diagnostics"])
    b._hessian = hessian


_LISSA_SCALARS = ("lambda_top", "lambda_batch", "lambda_min", "fit_hvps", "b")


def _lissa_export(b: LiSSACurvature) -> State:
    state: State = {k: getattr(b, k) for k in _LISSA_SCALARS}
    state.update(values=b.values, vectors=b.vectors, fit_diagnostics=dict(b.fit_diagnostics),
                 diagnostics=_diag(b))
    return state


def _lissa_import(b: LiSSACurvature, s: State, hessian: HessianOperator) -> None:
    if s["vectors"] is not None:
        _expect(s["vectors"], (hessian.shape[0], s["values"].numel()), "vectors")
    for k in _LISSA_SCALARS:
        setattr(b, k, s[k])
    b.b = int(s["b"])
    b.values, b.vectors = s["values"], s["vectors"]
    b.fit_diagnostics = dict(s["fit_diagnostics"])
    b.diagnostics = dict(s["diagnostics"])
    b._hessian = hessian


def _cg_export(b: CGCurvature) -> State:
    pre = b.preconditioner
    if pre is None:
        return {"preconditioner": None}
    if not isinstance(pre, CurvatureBackend):
        raise UncacheableError("cg with a preconditioner function cannot be cached")
    return {"preconditioner": export_state(pre)}


def _cg_import(b: CGCurvature, s: State, hessian: HessianOperator) -> None:
    if (s["preconditioner"] is None) != (b.preconditioner is None):
        raise ValueError("preconditioner presence differs")
    if s["preconditioner"] is not None:
        import_state(b.preconditioner, s["preconditioner"], hessian)  # type: ignore[arg-type]
    b._hessian = hessian


# Most specific class first (LowRank ⊂ Lanczos, EKFAC ⊂ KFAC share their parent's state).
ADAPTERS: list[tuple[type, Callable[[Any], State], Callable[[Any, State, HessianOperator], None]]] = [
    (DenseCurvature, _dense_export, _dense_import),
    (LanczosCurvature, _lanczos_export, _lanczos_import),
    (KFACCurvature, _kfac_export, _kfac_import),
    (LiSSACurvature, _lissa_export, _lissa_import),
    (CGCurvature, _cg_export, _cg_import),
]


def _expect(t: Any, shape: tuple, what: str) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} has shape {got}, expected {tuple(shape)}")


def _adapter(backend: CurvatureBackend):
    if callable(getattr(backend, "state_dict", None)) and callable(getattr(backend, "load_state_dict", None)):
        return (type(backend), type(backend).state_dict, type(backend).load_state_dict)
    for cls, exp, imp in ADAPTERS:
        if isinstance(backend, cls):
            return cls, exp, imp
    return None


def cacheable(backend: CurvatureBackend) -> bool:
    """Whether ``backend`` has a state adapter and fingerprintable settings."""
    if _adapter(backend) is None:
        return False
    try:
        backend_settings(backend)
    except UncacheableError:
        return False
    if isinstance(backend, CGCurvature) and backend.preconditioner is not None:
        return isinstance(backend.preconditioner, CurvatureBackend) and cacheable(backend.preconditioner)
    return True


def export_state(backend: CurvatureBackend) -> State:
    """The fitted state of ``backend`` (tensors and JSON-able values)."""
    adapter = _adapter(backend)
    if adapter is None:
        raise UncacheableError(f"no cache adapter for backend {backend.name!r} ({type(backend).__name__}); "
                               "define state_dict() and load_state_dict(state, hessian) on it.")
    if not backend.fitted:
        raise UncacheableError(f"the {backend.name!r} backend is not fitted; nothing to cache.")
    return adapter[1](backend)


def import_state(backend: CurvatureBackend, state: State, hessian: HessianOperator) -> None:
    """Restore a state made by :func:`export_state` into ``backend`` (marks it fitted for ``hessian``)."""
    adapter = _adapter(backend)
    if adapter is None:
        raise UncacheableError(f"no cache adapter for backend {backend.name!r}.")
    adapter[2](backend, state, hessian)


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CurvatureCache:
    """A folder of cached curvature fits, one sub-folder per (backend, key).

    >>> cache = CurvatureCache("~/.cache/hbt")
    >>> key = fingerprint(objective, backend, {"damping": 0.2})
    >>> if not cache.load(key, backend, hessian):
    ...     backend.fit(hessian)
    ...     cache.save(key, backend)
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.hits = 0
        self.misses = 0

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

    def load(self, key: str, backend: CurvatureBackend, hessian: HessianOperator) -> bool:
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
            digest = _file_sha256(tensors_path)
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
                    tensors[name] = t.to(hessian.device, copy=True)
        except Exception as err:  # safetensors raises its own SafetensorError and others
            return self._reject(tensors_path, f"cannot be opened by safetensors ({type(err).__name__}: {err})")
        try:
            state = _join(_unjson(state_meta), tensors)
            import_state(backend, state, hessian)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            backend._hessian = None  # leave it unfitted; fit() recomputes everything
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

        from . import __version__

        state = export_state(backend)
        tensors: dict[str, Tensor] = {}
        meta = _split(state, tensors, "")
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.entry(key, backend)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.directory))
        try:
            tensors_path = tmp / TENSORS_FILE
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tensors_path),
                      metadata={"format": str(FORMAT_VERSION), "key": key, "backend": backend.name})
            manifest = {
                "format": FORMAT_VERSION,
                "key": key,
                "backend": backend.name,
                "backend_class": _qualname(type(backend)),
                "settings": backend_settings(backend),
                "fingerprint": parts,
                "files": {TENSORS_FILE: {"sha256": _file_sha256(tensors_path),
                                         "bytes": tensors_path.stat().st_size}},
                "state": meta,
                "library": {"scalable_hbt": __version__, "torch": torch.__version__},
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            }
            with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=True, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an old ``dst``; ``dst`` is never seen half-written."""
    try:
        os.replace(src, dst)  # atomic when dst is absent (or an empty folder)
        return
    except OSError:
        if not dst.exists():
            raise
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def fit_cached(backend: CurvatureBackend, hessian: HessianOperator, cache: CurvatureCache | None,
               extra: dict | None = None) -> bool:
    """Fit ``backend`` unless already fitted, through ``cache``: load the entry keyed by
    :func:`fingerprint` (objective, backend, ``extra``) or fit and save it. Backends that
    cannot be cached are simply fitted. Returns ``True`` when loaded from the cache."""
    if backend.fitted:
        return False
    if cache is None or not cacheable(backend):
        backend.fit(hessian)
        return False
    parts = fingerprint_parts(hessian.objective, backend, extra)
    key = _key_of(parts)
    if cache.load(key, backend, hessian):
        return True
    backend.fit(hessian)
    if distributed.is_writer():  # every rank holds the same fit; one writes it
        cache.save(key, backend, parts)
    return False


__all__ = ["CurvatureCache", "CacheWarning", "UncacheableError", "fingerprint", "fingerprint_parts", "data_digest",
           "backend_settings", "cacheable", "export_state", "import_state", "fit_cached", "ADAPTERS"]
