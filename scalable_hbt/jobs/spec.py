"""The job file: a TOML document validated into a :class:`JobSpec`.

Example (every key shown; the ``[model]``, ``[data]`` and ``[output]`` tables are required)::

    [model]
    factory = "mypkg.models:make_model"   # importable callable returning an nn.Module
    kwargs = { width = 64 }               # passed to the factory
    state_dict = "weights.pt"             # optional, loaded with torch.load(weights_only=True)
    # torchscript = "model.ts"            # instead of factory: a TorchScript file

    [data]
    train = "train.npz"                   # .npz with arrays X and y, a .pt file holding (X, y) or
    test = "test.npz"                     # {"X":…, "y":…}, or "module:function" returning (X, y) or a Dataset

    [objective]
    loss = "cross_entropy"                # or "mse"
    weight_decay = 5e-5
    batch_size = 256
    dtype = "float32"                     # or "float64"
    device = "cpu"                        # or "cuda", "cuda:1"

    [curvature]
    damping = "auto"                      # or a number
    inverse = "cg"                        # dense | cg | lissa | kfac | ekfac | lowrank
    eigen = "lanczos"                     # dense | lanczos | lowrank
    inverse_options = { rtol = 1e-8 }
    eigen_options = { m = 20 }
    rue_damping = 1.2                     # optional; default damping + 1
    max_vectors = 32                      # HVPs batched together; cg/lissa solve this many columns at a time
    cache_graphs = false                  # keep the training chunks' gradient graphs between HVPs (small networks)

    [methods]
    run = ["influence", "relatif", "rue", "lees"]
    labels = "true"                       # "true" or "predicted" (LEES always uses its own default unless set)
    test_loss = "objective"
    relatif_normalizer = "ekfac"          # optional
    rue = { n_bootstrap = 50, seed = 0, method = "bootstrap" }
    lees = { threshold = 0.1 }            # or { m = 10 } or { m = "auto" }

    [output]
    dir = "results"
    chunk_size = 64                       # test points per chunk (one file per method and chunk)

Relative paths are taken relative to the job file's folder.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..curvature import EIGEN_BACKENDS, INVERSE_BACKENDS

METHODS = ("influence", "similarity", "relatif", "rue", "lees")


class JobError(ValueError):
    """A malformed job file; the message names the key and what is expected."""


@dataclass
class JobSpec:
    """A validated job. ``raw`` is the parsed TOML; ``digest`` identifies its content."""

    path: Path
    raw: dict[str, Any]
    digest: str
    model: dict[str, Any]
    data: dict[str, Any]
    objective: dict[str, Any] = field(default_factory=dict)
    curvature: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)
    output_dir: Path = Path("results")
    chunk_size: int = 64

    def resolve(self, value: str) -> str:
        """A path relative to the job file's folder (``module:function`` specs are left alone)."""
        if _is_import_spec(value):
            return value
        p = Path(value)
        return str(p if p.is_absolute() else self.path.parent / p)


def _is_import_spec(value: str) -> bool:
    return ":" in value and not Path(value).suffix and "/" not in value.split(":")[0]


def _table(doc: dict, key: str, required: bool) -> dict:
    if key not in doc:
        if required:
            raise JobError(f"missing table [{key}]; see `scalable_hbt.jobs.spec` for an example job file.")
        return {}
    if not isinstance(doc[key], dict):
        raise JobError(f"[{key}] must be a table, got {type(doc[key]).__name__}.")
    return doc[key]


def _expect(table: dict, name: str, key: str, kinds: tuple[type, ...], what: str, default: Any = None,
            required: bool = False) -> Any:
    if key not in table:
        if required:
            raise JobError(f"[{name}] needs the key '{key}' ({what}).")
        return default
    value = table[key]
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise JobError(f"[{name}] {key} = {value!r}: expected {what}.")
    return value


def _choice(table: dict, name: str, key: str, allowed: tuple[str, ...] | list[str], default: str) -> str:
    value = _expect(table, name, key, (str,), f"one of {sorted(allowed)}", default)
    if value not in allowed:
        raise JobError(f"[{name}] {key} = {value!r}: expected one of {sorted(allowed)}.")
    return value


def _unknown(table: dict, name: str, known: tuple[str, ...]) -> None:
    extra = sorted(set(table) - set(known))
    if extra:
        raise JobError(f"[{name}] has unknown key(s) {extra}; known keys: {sorted(known)}.")


def load_job(path: str | Path) -> JobSpec:
    """Parse and validate a job file; raise :class:`JobError` naming the offending key."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"job file {str(path)!r} does not exist.")
    text = path.read_bytes()
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise JobError(f"{path} is not valid TOML: {err}") from err
    _unknown(doc, "job file", ("model", "data", "objective", "curvature", "methods", "output"))

    model = _table(doc, "model", True)
    _unknown(model, "model", ("factory", "kwargs", "state_dict", "torchscript"))
    if ("factory" in model) == ("torchscript" in model):
        raise JobError("[model] needs exactly one of 'factory' (\"module:function\") or 'torchscript' (a file).")
    if "factory" in model:
        factory = _expect(model, "model", "factory", (str,), 'a "module:function" string')
        if not _is_import_spec(factory):
            raise JobError(f"[model] factory = {factory!r}: expected \"module:function\".")
    else:
        _expect(model, "model", "torchscript", (str,), "a path to a TorchScript file")
    _expect(model, "model", "kwargs", (dict,), "a table of keyword arguments", {})
    _expect(model, "model", "state_dict", (str,), "a path to a state-dict file")

    data = _table(doc, "data", True)
    _unknown(data, "data", ("train", "test"))
    for key in ("train", "test"):
        spec = _expect(data, "data", key, (str,), 'a .npz or .pt file, or "module:function"', required=True)
        if not (_is_import_spec(spec) or Path(spec).suffix in (".npz", ".pt", ".pth")):
            raise JobError(f"[data] {key} = {spec!r}: expected a .npz or .pt file, or \"module:function\".")

    objective = _table(doc, "objective", False)
    _unknown(objective, "objective", ("loss", "weight_decay", "batch_size", "dtype", "device"))
    _choice(objective, "objective", "loss", ("cross_entropy", "mse"), "cross_entropy")
    wd = _expect(objective, "objective", "weight_decay", (int, float), "a number ≥ 0", 0.0)
    if wd < 0:
        raise JobError(f"[objective] weight_decay = {wd!r}: expected a number ≥ 0.")
    bs = _expect(objective, "objective", "batch_size", (int,), "an integer ≥ 1", 256)
    if bs < 1:
        raise JobError(f"[objective] batch_size = {bs!r}: expected an integer ≥ 1.")
    _choice(objective, "objective", "dtype", ("float32", "float64"), "float32")
    _expect(objective, "objective", "device", (str,), 'a torch device such as "cpu" or "cuda"', "cpu")

    curvature = _table(doc, "curvature", False)
    _unknown(curvature, "curvature", ("damping", "inverse", "eigen", "inverse_options", "eigen_options", "rue_damping",
                                      "max_vectors", "cache_graphs"))
    damping = curvature.get("damping", "auto")
    if not (damping == "auto" or (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping >= 0)):
        raise JobError(f"[curvature] damping = {damping!r}: expected \"auto\" or a number ≥ 0.")
    _choice(curvature, "curvature", "inverse", list(INVERSE_BACKENDS), "cg")
    _choice(curvature, "curvature", "eigen", list(EIGEN_BACKENDS), "lanczos")
    _expect(curvature, "curvature", "inverse_options", (dict,), "a table of backend options", {})
    _expect(curvature, "curvature", "eigen_options", (dict,), "a table of backend options", {})
    rue_damping = _expect(curvature, "curvature", "rue_damping", (int, float), "a number > 0")
    if rue_damping is not None and not rue_damping > 0:
        raise JobError(f"[curvature] rue_damping = {rue_damping!r}: expected a number > 0.")
    vectors = _expect(curvature, "curvature", "max_vectors", (int,), "an integer ≥ 1", 32)
    if vectors < 1:
        raise JobError(f"[curvature] max_vectors = {vectors!r}: expected an integer ≥ 1.")
    _expect(curvature, "curvature", "cache_graphs", (bool,), "true or false", False)

    methods = _table(doc, "methods", False)
    _unknown(methods, "methods", ("run", "labels", "test_loss", "relatif_normalizer", "rue", "lees"))
    run = _expect(methods, "methods", "run", (list,), f"a list drawn from {list(METHODS)}", ["influence"])
    bad = [m for m in run if m not in METHODS]
    if bad or not run:
        raise JobError(f"[methods] run = {run!r}: expected a non-empty list drawn from {list(METHODS)}.")
    _choice(methods, "methods", "labels", ("true", "predicted"), "true")
    _choice(methods, "methods", "test_loss", ("objective", "loss"), "objective")
    _expect(methods, "methods", "relatif_normalizer", (str,), "a backend name")
    rue = _expect(methods, "methods", "rue", (dict,), "a table (n_bootstrap, seed, method)", {})
    _unknown(rue, "methods.rue", ("n_bootstrap", "seed", "method"))
    lees = _expect(methods, "methods", "lees", (dict,), "a table (m or threshold)", {})
    _unknown(lees, "methods.lees", ("m", "threshold", "labels"))

    output = _table(doc, "output", True)
    _unknown(output, "output", ("dir", "chunk_size"))
    out_dir = _expect(output, "output", "dir", (str,), "a folder path", required=True)
    chunk = _expect(output, "output", "chunk_size", (int,), "an integer ≥ 1", 64)
    if chunk < 1:
        raise JobError(f"[output] chunk_size = {chunk!r}: expected an integer ≥ 1.")

    spec = JobSpec(path=path.resolve(), raw=doc, digest=hashlib.sha256(text).hexdigest(), model=model, data=data,
                   objective=objective, curvature=curvature, methods=methods, chunk_size=chunk)
    spec.output_dir = Path(spec.resolve(out_dir))
    return spec
