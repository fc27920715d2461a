"""Run a validated job: load and check everything, fit once, then every method chunk by chunk,
resumable, with every stored number traceable to the inputs that produced it.

Layout of the output folder::

    job.json                       the job's identity (fingerprint parts and key), sizes, chunking
    .lock                          held by the running process (its pid inside)
    cache/                         the fitted curvature (safetensors), so a restarted job does not refit
    influence/chunk-000003.npy     rows of test points [3·c, 4·c) (one file per method and chunk)
    influence/chunk-000003.json    that chunk's record: rows, shape, dtype, sha256, the job key
    summary.json                   time per phase, HVPs, solver diagnostics (rewritten at the end)

A job's identity is a fingerprint of everything that determines its numbers — model
parameters and code, training and test data, loss and weight decay, curvature settings,
each method's settings, chunking and the library version — made by the same mechanism as
the curvature cache's keys. Rerun on a folder whose ``job.json`` differs, the job is refused
with the parts that changed named (``--overwrite`` starts over). A chunk counts as done only
when its record matches the file (size and sha256) and the job key; anything else is
recomputed with a warning. Each file is written to a temporary name and renamed, so a job
killed at any moment leaves only whole files, and the debris of a killed writer is removed on
the next run.

Under ``torch.distributed`` (``torchrun ... -m scalable_hbt.apps.cli run JOB.toml``) rank 0
takes the lock and decides which chunks are pending; chunks of methods that need only the
test points once prepared (LEES, bootstrap RUE) are dealt out to the ranks, each writing its
own; influence, similarity and RelatIF chunks run on all ranks together (their solves and
training-data passes are collectives over the sharded training set) and rank 0 writes them.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import distributed
from ...cache import digest, library_versions, objective_parts
from ...cache.fingerprint import canonical, data_digest
from ...data import DataSource
from ...errors import InputError
from ...files import atomic_write, file_sha256, remove_debris, write_json
from ...log import logger, progress_bar
from ...memory import format_bytes
from ...methods import METHODS
from ...toolbox import Toolbox
from .spec import JobError, JobSpec

JOB_FILE = "job.json"
LOCK_FILE = ".lock"


# ---------------------------------------------------------------------------------------------- loading
@contextmanager
def _job_folder_importable(spec: JobSpec) -> Iterator[None]:
    """Put the job file's folder first on the import path, as a user expects for a factory
    module lying beside the job file."""
    folder = str(spec.folder)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _import(spec: str, what: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise JobError(f"{what} = {spec!r} cannot be imported: {err}. The module must lie beside the job file "
                       "or on PYTHONPATH.") from err


def load_model(spec: JobSpec) -> nn.Module:
    """The model named by ``[model]``: a factory (plus optional state dict) or a TorchScript file."""
    m = spec.model
    if m.torchscript is not None:
        path = spec.resolve(m.torchscript)
        if not path.is_file():
            raise JobError(f"[model] torchscript = {m.torchscript!r}: file {str(path)!r} does not exist.")
        return torch.jit.load(str(path), map_location="cpu")
    with _job_folder_importable(spec):
        factory = _import(m.factory, "[model] factory")  # type: ignore[arg-type]
    try:
        model = factory(**m.kwargs)
    except TypeError as err:
        raise JobError(f"[model] factory {m.factory!r} cannot be called with kwargs {m.kwargs}: {err}") from err
    if not isinstance(model, nn.Module):
        raise JobError(f"[model] factory {m.factory!r} returned {type(model).__name__}, not an nn.Module.")
    if m.state_dict is not None:
        path = spec.resolve(m.state_dict)
        if not path.is_file():
            raise JobError(f"[model] state_dict = {m.state_dict!r}: file {str(path)!r} does not exist.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise JobError(f"[model] state_dict {m.state_dict!r} does not fit the model: {err}") from err
    return model.eval()


def load_data(spec: JobSpec, key: str) -> Any:
    """``[data] train|test``: (X, y) tensors from .npz/.pt, or what a factory returns."""
    source = spec.train if key == "train" else spec.test
    path = spec.resolve(source)
    if not path.is_file() and ":" in source:
        with _job_folder_importable(spec):
            return _import(source, f"[data] {key}")()
    if not path.is_file():
        raise JobError(f"[data] {key} = {source!r}: file {str(path)!r} does not exist.")
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            if "X" not in arrays:
                raise JobError(f"[data] {key}: {path.name} must contain an array named 'X' (and 'y').")
            X = torch.from_numpy(arrays["X"])
            y = torch.from_numpy(arrays["y"]) if "y" in arrays else None
        return (X, y) if y is not None else X
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if "X" not in obj:
            raise JobError(f"[data] {key}: {path.name} must hold a dict with 'X' (and 'y') or a tuple (X, y).")
        return (obj["X"], obj["y"]) if "y" in obj else obj["X"]
    return obj


@dataclass
class PreparedJob:
    """A job whose model and data are loaded and checked, ready to run (or to plan)."""

    spec: JobSpec
    toolbox: Toolbox
    X_test: torch.Tensor
    y_test: torch.Tensor | None
    identity: dict[str, Any]

    def method_key(self, method: str) -> str:
        """The key every chunk record of ``method`` carries (see :func:`method_key`)."""
        return method_key(self.identity, method)

    @property
    def n_test(self) -> int:
        return len(self.X_test)

    @property
    def chunks(self) -> int:
        return -(-self.n_test // self.spec.chunk_size)

    def chunk_rows(self, method: str) -> list[tuple[int, int]]:
        """The rows of every chunk of ``method`` (see :func:`chunk_rows`)."""
        return chunk_rows(METHODS[method].domain, self.n_test, self.toolbox.objective.n, self.spec.chunk_size)


def chunk_rows(domain: str, n_test: int, n_train: int, chunk_size: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of each chunk: test points in chunks of ``chunk_size`` for a method over
    test points; one chunk of all n training points for a method over the training data."""
    if domain == "train":
        return [(0, n_train)]
    return [(lo, min(lo + chunk_size, n_test)) for lo in range(0, n_test, chunk_size)]


def method_key(identity: dict[str, Any], method: str) -> str:
    """sha256 of the job's shared inputs (everything but the methods) and ``method``'s settings:
    a chunk is valid only for the inputs and settings that produced it."""
    shared = {k: v for k, v in identity.items() if k != "methods"}
    return digest({"inputs": shared, "method": method, "settings": identity["methods"][method]})


def job_identity(spec: JobSpec, tb: Toolbox, test: DataSource) -> dict[str, Any]:
    """Everything that determines the job's numbers, as fingerprint parts (see the module docstring),
    in the JSON form ``job.json`` stores."""
    return json.loads(json.dumps({
        "objective": objective_parts(tb.objective),
        "test_data": data_digest(test),
        "curvature": canonical(spec.curvature, "curvature"),
        "methods": {name: canonical(settings, f"methods.{name}") for name, settings in spec.methods.items()},
        "chunk_size": spec.chunk_size,
        "library": {k: v for k, v in library_versions().items() if k != "python"},
    }))


def prepare_job(spec: JobSpec, *, progress: bool = True) -> PreparedJob:
    """Load the model and data, build the Objective and Toolbox, and check everything that
    needs them, before any computation (a dry run stops here)."""
    model = load_model(spec)
    train = load_data(spec, "train")
    test = load_data(spec, "test")
    X_test, y_test = test if isinstance(test, tuple) else (test, None)
    if not isinstance(X_test, torch.Tensor):
        raise JobError("[data] test must give tensors (X, y) or X; Datasets are supported for train only.")
    try:
        obj = spec.objective.build(model, train, device=distributed.local_device(spec.objective.device),
                                   progress=progress and distributed.is_writer())
        tb = Toolbox(obj, spec.curvature, cache_dir=spec.output_dir / "cache")
        source = obj.source(X_test, y_test)
    except InputError as err:
        raise JobError(str(err)) from err
    M = obj.num_params
    for name, settings in spec.methods.items():
        if getattr(settings, "labels", "predicted") == "true" and y_test is None:
            raise JobError(f"[methods.{name}] labels = 'true' but the test data has no targets; give y or use "
                           "labels = 'predicted'.")
        if name == "lees" and isinstance(settings.m, int) and settings.m > M:
            raise JobError(f"[methods.lees] m = {settings.m}: expected at most M = {M} (the model's parameters).")
    return PreparedJob(spec, tb, X_test, y_test, job_identity(spec, tb, source))


def plan(job: PreparedJob) -> dict[str, Any]:
    """Sizes, chunks and memory estimates (bytes) of the work a job will do, from the backends'
    own estimates."""
    tb, spec = job.toolbox, job.spec
    obj, op = tb.objective, tb.operator
    item = obj.dtype.itemsize
    M, n, chunk = obj.num_params, obj.n, spec.chunk_size
    memory = {"parameters": M * item, "per_sample_gradient_chunk": obj.per_sample_grad_chunk() * M * item,
              "test_gradients_per_chunk": chunk * M * item}
    if any(METHODS[m].per_training_point for m in spec.methods):
        memory["influence_rows_per_chunk"] = chunk * n * item
    backends = {"inverse": tb.inverse} if tb.eigen in (None, tb.inverse) else {"inverse": tb.inverse, "eigen": tb.eigen}
    for role, backend in backends.items():
        for part, size in backend.memory_estimate(op, chunk).items():
            memory[f"{role} {backend.name}: {part}"] = size
    if "rue" in spec.methods and spec.methods["rue"].method == "bootstrap":
        memory["rue_parameter_shifts"] = spec.methods["rue"].n_bootstrap * M * item
    return {"num_params": M, "n_train": n, "n_test": job.n_test, "chunk_size": chunk, "chunks": job.chunks,
            "methods": list(spec.methods), "inverse": tb.inverse.name, "eigen": tb.eigen.name if tb.eigen else None,
            "curvature": op.kind, "memory_bytes": memory}


# ---------------------------------------------------------------------------------------------- the output folder
class FolderLocked(JobError):
    """Another process is running a job in the same output folder."""


@contextmanager
def folder_lock(folder: Path, *, wait: bool) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (an flock on ``folder/.lock`` holding our pid); a
    second process refuses, naming the holder, or waits for it with ``wait``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise FolderLocked(f"the output folder {str(folder)!r} is in use by another `hbt run` (pid {holder}); "
                               "wait for it to finish, run with --wait, or choose another [output] dir.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted paths at which two fingerprint documents differ (at most a few levels deep)."""
    if isinstance(old, dict) and isinstance(new, dict) and path.count(".") < 3:
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [path]


_PART_NAMES = {"objective.model.theta": "the model's parameters", "objective.model.code": "the model's code",
               "objective.model.repr": "the model's structure", "objective.model.buffers": "the model's buffers",
               "objective.data": "the training data", "test_data": "the test data",
               "objective.loss": "the loss", "objective.objective": "the objective settings",
               "objective.batch_size": "the batch size", "curvature": "the [curvature] settings",
               "chunk_size": "the chunk size", "library": "the library version"}


def _describe(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        name = next((v for k, v in _PART_NAMES.items() if p == k or p.startswith(k + ".")), None)
        if name is None and p.startswith("methods."):
            name = f"the [methods] settings of {p.split('.')[1]}"
        names.append(name or p)
    return list(dict.fromkeys(names))


def claim_folder(job: PreparedJob, *, overwrite: bool) -> None:
    """Check that the output folder holds nothing but this job's results and record the job in
    ``job.json`` (rank 0 decides and writes; every rank learns the verdict). Methods may be added
    to a job; any other difference is refused, naming what changed."""
    spec = job.spec
    problem = None
    if distributed.is_writer():
        out = spec.output_dir
        manifest = out / JOB_FILE
        if overwrite:
            for item in out.iterdir() if out.is_dir() else ():
                if item.name not in (LOCK_FILE, "cache"):
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        record = {"job_file": str(spec.path), "identity": job.identity, "n_test": job.n_test,
                  "n_train": job.toolbox.objective.n, "chunk_size": spec.chunk_size}
        if manifest.exists():
            try:
                previous = json.loads(manifest.read_text())
                old_identity = previous["identity"]
            except (ValueError, KeyError, TypeError):
                previous, old_identity = None, None
            if old_identity is None:
                problem = (f"the output folder {str(out)!r} has a job.json this version cannot read; start over with "
                           "--overwrite or choose another [output] dir.")
            else:
                shared = {k: v for k, v in job.identity.items() if k != "methods"}
                old_shared = {k: v for k, v in old_identity.items() if k != "methods"}
                changed = _differences(old_shared, shared)
                changed += [f"methods.{m}" for m, s in job.identity["methods"].items()
                            if m in old_identity.get("methods", {}) and old_identity["methods"][m] != s]
                if changed:
                    problem = (f"the output folder {str(out)!r} holds results of a different job: since they were "
                               f"computed, {', '.join(_describe(changed))} changed. Rerun with --overwrite to start "
                               "over, or choose another [output] dir.")
                else:  # methods may be added: the record keeps them all
                    methods = {**old_identity.get("methods", {}), **job.identity["methods"]}
                    record["identity"] = {**job.identity, "methods": methods}
        if problem is None:
            write_json(manifest, record)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise JobError(problem)


def _record_path(folder: Path, method: str, chunk: int) -> Path:
    return folder / method / f"chunk-{chunk:06d}.json"


def chunk_problem(folder: Path, method: str, chunk: int, rows: tuple[int, int], key: str) -> str | None:
    """Why chunk ``chunk`` of ``method`` is not a valid result of the job ``key`` (``None``: it is)."""
    record_path = _record_path(folder, method, chunk)
    if not record_path.exists():
        return "missing"
    try:
        record = json.loads(record_path.read_text())
        data = record_path.with_name(record["file"])
    except (ValueError, KeyError, TypeError):
        return "has an unreadable record"
    if not data.exists():
        return "missing"
    if record.get("key") != key:
        return "belongs to another job"
    if record.get("rows") != list(rows):
        return f"holds rows {record.get('rows')}, not {list(rows)}"
    if data.stat().st_size != record.get("bytes") or file_sha256(data) != record.get("sha256"):
        return "does not match its recorded checksum (truncated or altered)"
    return None


def save_chunk(folder: Path, method: str, chunk: int, rows: tuple[int, int], key: str,
               result: np.ndarray | dict[str, np.ndarray]) -> None:
    """Write a chunk's record, then its rows (both atomically): a visible chunk file always has
    the record that vouches for it, so a kill between the two only leaves a chunk to recompute.
    One array is a ``.npy`` file; named arrays (a top-k query) one ``.npz``."""
    record_path = _record_path(folder, method, chunk)
    buffer = io.BytesIO()
    if isinstance(result, dict):
        np.savez(buffer, **result)
        shapes = {k: list(v.shape) for k, v in result.items()}
    else:
        np.save(buffer, result)
        shapes = list(result.shape)
    data = buffer.getvalue()
    name = record_path.with_suffix(".npz" if isinstance(result, dict) else ".npy").name
    write_json(record_path, {"rows": list(rows), "file": name, "shape": shapes, "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest(), "key": key})
    atomic_write(record_path.with_name(name), lambda fh: fh.write(data))


def load_chunk(folder: Path, method: str, chunk: int) -> np.ndarray | dict[str, np.ndarray]:
    record_path = _record_path(folder, method, chunk)
    path = record_path.with_name(json.loads(record_path.read_text())["file"])
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {k: arrays[k] for k in arrays.files}
    return np.load(path)


# ---------------------------------------------------------------------------------------------- running
def _pending(job: PreparedJob) -> list[tuple[int, str]]:
    """The (chunk, method) pairs without a valid chunk, as rank 0 sees them (every rank must run
    the same collective solves, so none decides from its own view of the folder)."""
    todo = None
    if distributed.is_writer():
        todo = []
        ranges = {method: job.chunk_rows(method) for method in job.spec.methods}
        for c in range(max(len(r) for r in ranges.values())):
            for method in job.spec.methods:
                if c >= len(ranges[method]):
                    continue
                problem = chunk_problem(job.spec.output_dir, method, c, ranges[method][c], job.method_key(method))
                if problem is None:
                    continue
                if problem != "missing":
                    warnings.warn(f"{method} chunk {c} {problem}; recomputing it.", RuntimeWarning, stacklevel=2)
                todo.append((c, method))
    return distributed.broadcast_object(todo)


def _compute(tb: Toolbox, method: str, settings: Any, X: torch.Tensor | None,
             y: torch.Tensor | None) -> np.ndarray | dict[str, np.ndarray]:
    result = tb.compute(method, X, y, settings=settings)
    if isinstance(result, dict):
        return {k: v.detach().cpu().numpy() for k, v in result.items()}
    return result.detach().cpu().numpy()


def run_job(spec: JobSpec, *, dry_run: bool = False, overwrite: bool = False, wait: bool = False,
            progress: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or, with ``dry_run``, only check and plan) a job; returns the summary (or the plan)."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    job = prepare_job(spec, progress=progress)
    times["load"] = time.perf_counter() - t0
    info = plan(job)
    if dry_run:
        echo(f"job {spec.path.name}: M = {info['num_params']:,} parameters, n = {info['n_train']:,} training and "
             f"{info['n_test']:,} test points in {info['chunks']} chunks of {info['chunk_size']}")
        echo(f"  methods {info['methods']} with inverse={info['inverse']}, eigen={info['eigen']} on the "
             f"{info['curvature']}; output {spec.output_dir}")
        for name, size in info["memory_bytes"].items():
            echo(f"  memory {name:<40} {format_bytes(size)}")
        return info
    lock = folder_lock(spec.output_dir, wait=wait) if distributed.is_writer() else _no_lock()
    with lock:
        return _run_locked(job, info, times, overwrite=overwrite, progress=progress, echo=echo)


@contextmanager
def _no_lock() -> Iterator[None]:
    yield


def _run_locked(job: PreparedJob, info: dict[str, Any], times: dict[str, float], *, overwrite: bool,
                progress: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    spec, tb = job.spec, job.toolbox
    claim_folder(job, overwrite=overwrite)
    if distributed.is_writer():
        for folder in [spec.output_dir, *(spec.output_dir / m for m in spec.methods)]:
            folder.mkdir(parents=True, exist_ok=True)
            for item in remove_debris(folder):
                logger.info("removed %s left by an interrupted run", item)
    distributed.barrier()
    t0 = time.perf_counter()
    tb.fit()
    times["fit"] = time.perf_counter() - t0
    todo = _pending(job)
    skipped = sum(len(job.chunk_rows(m)) for m in spec.methods) - len(todo)
    wanted = {method for _, method in todo}
    for method in spec.methods:  # what every chunk reuses (RUE's shifts, RelatIF's normalizer), once, on all ranks
        times[method] = 0.0
        if method in wanted:
            t1 = time.perf_counter()
            METHODS[method].prepare(tb, spec.methods[method])
            times[method] += time.perf_counter() - t1
    local = {m for m in wanted if METHODS[m].test_local(spec.methods[m])}
    rank, world = distributed.rank(), distributed.world_size()
    show = progress and distributed.is_writer()
    for c, method in progress_bar(todo, total=len(todo), desc="test chunks", enabled=show):
        if method in local and c % world != rank:
            continue  # another rank's chunk
        lo, hi = job.chunk_rows(method)[c]
        t1 = time.perf_counter()
        if METHODS[method].domain == "train":
            result = _compute(tb, method, spec.methods[method], None, None)
        else:
            result = _compute(tb, method, spec.methods[method], job.X_test[lo:hi],
                              job.y_test[lo:hi] if job.y_test is not None else None)
        if method in local or distributed.is_writer():
            save_chunk(spec.output_dir, method, c, (lo, hi), job.method_key(method), result)
        times[method] += time.perf_counter() - t1
    distributed.barrier()
    summary = {"job_file": str(spec.path), "plan": info, "seconds": times, "chunks_computed": len(todo),
               "chunks_skipped": skipped, "toolbox": tb.diagnostics}
    if distributed.is_writer():
        write_json(spec.output_dir / "summary.json", summary)
    echo(f"done: {len(todo)} chunk files computed, {skipped} already there; seconds "
         + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f"; HVPs {tb.operator.num_hvps:.0f}")
    return summary


# ---------------------------------------------------------------------------------------------- reading
def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0–2, 5"``."""
    if not indices:
        return ""
    out, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}–{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def read_results(output_dir: str | Path, method: str, *, allow_partial: bool = False):
    """A method's rows for every test point, in order (``(T, n)`` or ``(T,)``; for a method over the
    training data, its ``(n,)`` values; for a top-k query, a dict of ``(T, k)`` arrays), each
    chunk checked against its record and the job key.

    An incomplete result is refused, naming the missing test points; with ``allow_partial=True``
    the valid rows are returned with their test-point indices, ``(rows, indices)``."""
    folder = Path(output_dir)
    try:
        record = json.loads((folder / JOB_FILE).read_text())
        identity, n_test, chunk_size = record["identity"], int(record["n_test"]), int(record["chunk_size"])
        n_train = int(record["n_train"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise JobError(f"{str(folder)!r} is not the output folder of a job ({JOB_FILE} missing or unreadable: "
                       f"{err}).") from None
    if method not in identity.get("methods", {}):
        raise JobError(f"the job in {str(folder)!r} did not run {method!r}; it ran {sorted(identity.get('methods', {}))}.")
    key = method_key(identity, method)
    domain = METHODS[method].domain if method in METHODS else "test"
    total = n_train if domain == "train" else n_test
    parts, indices, missing = [], [], []
    for c, (lo, hi) in enumerate(chunk_rows(domain, n_test, n_train, chunk_size)):
        problem = chunk_problem(folder, method, c, (lo, hi), key)
        if problem is None:
            parts.append(load_chunk(folder, method, c))
            indices.extend(range(lo, hi))
        else:
            missing.extend(range(lo, hi))
    what = "training points" if domain == "train" else "test points"
    if missing and not allow_partial:
        raise JobError(f"{method} results in {str(folder)!r} are incomplete: {what} {_ranges(missing)} of "
                       f"{total} are missing or invalid. Run the job again to complete them, or pass "
                       "allow_partial=True to get the rows there are with their indices.")
    if parts and isinstance(parts[0], dict):
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    else:
        rows = np.concatenate(parts) if parts else np.empty((0,))
    return (rows, np.asarray(indices, dtype=np.int64)) if allow_partial else rows
