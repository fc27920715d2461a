"""Fingerprints: a sha256 of everything that determines a computed result.

A fingerprint is the sha256 of a canonical JSON document (:func:`digest`). Its parts:

* the objective (:func:`objective_parts`): the bytes of θ̃, of the buffers and frozen
  parameters, the parameter names and shapes, the model's structure (``repr``) and code
  (:func:`module_code_digest`), the loss (name, kind and code), weight decay, dtype, device and
  batch size, and a hash of every training input and target (:func:`data_digest`, streamed
  chunk by chunk, never all in memory);
* the settings of whatever consumes the objective (a backend's ``fit_settings()``, the
  operator's settings, a job's method settings), made exact by :func:`canonical` (floats by
  ``repr``, tensors by hash, backends by name and settings).

The curvature cache keys its entries with :func:`fingerprint`; batch jobs identify themselves
with the same parts, so one mechanism decides when a stored result may be reused.

What a fingerprint cannot see: code reached other than through names in the model's methods
(``getattr`` by string, C extensions, functions stored in attributes), global *values* that
code reads (only functions and classes are followed), files read at run time, and library
versions other than scalable_hbt's and torch's (recorded beside the key, not in it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import types
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature import CurvatureBackend
from ..data import DataSource
from ..objective import Objective
from ..version import __version__

FORMAT_VERSION = 2
_HASH_CHUNK_BYTES = 1 << 24
_LIBRARY_PREFIXES = ("torch", "numpy", "scipy", "builtins", "math", "functools", "typing", "collections")


class UncacheableError(TypeError):
    """A setting (e.g. a preconditioner given as a plain function) cannot be fingerprinted."""


# ---------------------------------------------------------------------------------------------- tensors and data
def tensor_digest(t: Tensor, h: Any | None = None) -> Any:
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


def tensor_summary(t: Tensor) -> dict:
    return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": tensor_digest(t).hexdigest()}


def data_digest(source: DataSource | Objective, batch_size: int = 256) -> dict:
    """sha256 of all inputs and of all targets of a data source (an Objective: its training
    data), streamed in chunks (one in memory at a time; independent of the chunk size)."""
    if isinstance(source, Objective):
        source, batch_size = source.train, source.batch_size
    hx, hy = hashlib.sha256(), hashlib.sha256()
    x_meta: tuple | None = None
    y_meta: tuple | None = None
    n = 0
    for batch in source.batches(batch_size):
        x = batch.x if isinstance(batch.x, Tensor) else torch.as_tensor(batch.x)
        x_meta = x_meta or (str(x.dtype), list(x.shape[1:]))
        tensor_digest(x, hx)
        if batch.y is not None:
            y = batch.y if isinstance(batch.y, Tensor) else torch.as_tensor(batch.y)
            y_meta = y_meta or (str(y.dtype), list(y.shape[1:]))
            tensor_digest(y, hy)
        n += len(batch)
    return {"n": n, "inputs": {"meta": x_meta, "sha256": hx.hexdigest()},
            "targets": {"meta": y_meta, "sha256": hy.hexdigest()}}


# ---------------------------------------------------------------------------------------------- code
def _code_text(code: types.CodeType) -> str:
    """Bytecode, names and constants of a code object, nested code objects (lambdas,
    comprehensions) included by content, so the text is the same in every process."""
    consts = [_code_text(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return "|".join([code.co_code.hex(), repr(code.co_names), "(" + ",".join(consts) + ")"])


def _is_library(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in _LIBRARY_PREFIXES


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _function_closure(fn: Any, out: dict[str, str], seen: set[int]) -> None:
    """Add the code of ``fn`` and, recursively, of the user-defined functions and classes its
    code names through its module's globals, to ``out`` (qualified name → code text)."""
    fn = getattr(fn, "__func__", fn)
    if id(fn) in seen:
        return
    seen.add(id(fn))
    if isinstance(fn, type):
        _class_closure(fn, out, seen)
        return
    code = getattr(fn, "__code__", None)
    if code is None or _is_library(fn):
        return
    out[f"{fn.__module__}.{fn.__qualname__}"] = _code_text(code)
    namespace = getattr(fn, "__globals__", {})
    for name in sorted(_global_names(code)):
        value = namespace.get(name)
        if (inspect.isfunction(value) or isinstance(value, type)) and not _is_library(value):
            _function_closure(value, out, seen)


def _class_closure(cls: type, out: dict[str, str], seen: set[int]) -> None:
    """The code of every function defined by ``cls`` and its user-defined bases."""
    for klass in cls.__mro__:
        if klass is object or _is_library(klass):
            continue
        for name, member in sorted(vars(klass).items()):
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                member = member.fget
            if inspect.isfunction(member):
                _function_closure(member, out, seen)


def module_code_digest(model: nn.Module) -> dict:
    """Identity of the code a model runs: for every class in the module tree, torch's own
    classes by name and torch version, user classes by the code of all their methods and of
    the user-defined functions and classes those reach through their globals."""
    classes = sorted({type(m) for m in model.modules()}, key=lambda c: (c.__module__, c.__qualname__))
    code: dict[str, str] = {}
    seen: set[int] = set()
    library = []
    for cls in classes:
        if _is_library(cls):
            library.append(f"{cls.__module__}.{cls.__qualname__}")
        else:
            _class_closure(cls, code, seen)
    return {"library_classes": library, "torch": torch.__version__,
            "code": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(code.items())}}


def callable_digest(fn: Any) -> str:
    """Identity of a Python callable: its code and the user-defined code it reaches."""
    code: dict[str, str] = {}
    _function_closure(fn, code, set())
    name = f"{getattr(fn, '__module__', type(fn).__module__)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    return hashlib.sha256(json.dumps({"name": name, "code": code}, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- settings
def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical(value: Any, where: str) -> Any:
    """A JSON-able, exact representation of a setting (floats by repr, tensors by hash,
    backends by name and fit settings, dataclasses by their fields)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, Tensor):
        return tensor_summary(value)
    if isinstance(value, (list, tuple)):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): canonical(v, f"{where}.{k}") for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, CurvatureBackend):
        return backend_parts(value)
    if hasattr(value, "__dataclass_fields__"):
        return {"dataclass": qualname(type(value)),
                "fields": {k: canonical(getattr(value, k), f"{where}.{k}") for k in value.__dataclass_fields__}}
    raise UncacheableError(f"setting {where} = {value!r} ({type(value).__name__}) cannot be fingerprinted; "
                           "pass plain numbers/strings (a preconditioner as a backend instance, not a function) "
                           "or do not use the curvature cache for this backend.")


def backend_parts(backend: CurvatureBackend) -> dict:
    """A backend's name, class and the settings its ``fit`` reads."""
    return {"name": backend.name, "class": qualname(type(backend)),
            "settings": canonical(backend.fit_settings(), f"{backend.name}.fit_settings()")}


# ---------------------------------------------------------------------------------------------- the parts
def objective_parts(objective: Objective) -> dict:
    """Everything about the objective that determines a curvature or a gradient."""
    task = objective.task
    return {
        "objective": canonical(objective.fingerprint_parts(), "objective"),
        "batch_size": objective.batch_size,
        "loss": {"name": task.name, "targets": task.targets, "code": callable_digest(task.loss),
                 "measurement": None if task.measurement is None else callable_digest(task.measurement),
                 "output": task.output if task.output is None or isinstance(task.output, str)
                 else callable_digest(task.output),
                 "target_key": task.target_key, "ignore_index": task.ignore_index, "shift": task.shift},
        "model": {
            "theta": tensor_summary(objective.theta),
            "param_names": list(objective.param_names),
            "param_shapes": [list(s) for s in objective.param_shapes],
            "buffers": {k: tensor_summary(b) for k, b in sorted(objective.buffers.items())},
            "repr": repr(objective.model),
            "code": module_code_digest(objective.model),
        },
        "data": data_digest(objective),
    }


def fingerprint_parts(objective: Objective, backend: CurvatureBackend, extra: dict | None = None) -> dict:
    """The parts of a curvature cache key: the objective, the backend and ``extra`` (the
    operator's settings when the Toolbox asks)."""
    return {"format": FORMAT_VERSION, **objective_parts(objective), "backend": backend_parts(backend),
            "extra": canonical(dict(extra or {}), "extra")}


def digest(parts: dict) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(objective: Objective, backend: CurvatureBackend, extra: dict | None = None) -> str:
    """The cache key of ``backend`` fitted on ``objective``'s curvature with settings ``extra``.

    Raises :class:`UncacheableError` when a setting cannot be fingerprinted."""
    return digest(fingerprint_parts(objective, backend, extra))


def library_versions() -> dict:
    """Versions recorded beside a key: this library, torch and Python."""
    return {"scalable_hbt": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
