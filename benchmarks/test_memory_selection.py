"""Parameter selection and memory: studying the last block of a deep model costs the memory of that
block, not of the frozen backbone.

The model is a GPT-2 causal LM (float32, eval mode) whose frozen rest is ≥ 10× the studied part:
16 blocks of width 256, vocabulary 1024, with ``params=["transformer.h.15.*"]`` (the last block,
M = 789,760). n = 8 sequences of 32 tokens, chunks of 4 (small activations, so that what is left is
the curvature work). Every scenario runs in a fresh process
(``python benchmarks/test_memory_selection.py --scenario NAME`` prints one JSON line), so that each
peak belongs to that scenario alone; memory is ``scalable_hbt.memory.PeakMemory`` (the resident set
size sampled every 5 ms on CPU) above the process's size once the model and the data exist and one
inference forward of a chunk has run (the allocator keeps the memory that forward reaches, ≈ 260 MiB
here, and every later phase reuses it; it is reported as ``inference_forward_bytes``).

Scenarios:

* ``selected``: ``Objective(dtype=float32, params=[last block])`` — the model's own dtype, so the
  frozen tensors are used in place (no copy, no cast);
* ``selected_4_layers``: the same on a GPT-2 with 4 blocks (a backbone 4× smaller): the peak should
  not change;
* ``selected_float64``: the same selection with ``dtype=float64``: the forward runs in float64, so
  the frozen backbone is cast — a float64 copy of it, twice its float32 size (shown for contrast);
* ``all``: every parameter studied (``params=None``), float32.

What the design promises, and the test asserts: building the Objective with the selection costs
about one copy of the block (θ), not of the backbone; the whole run (Objective, HVPs, CG) costs a
multiple of the block's size that does not change when the backbone shrinks 4×, and a small part
of the run that studies every parameter; ``dtype=float64`` on a float32 model casts the backbone.

Phases, each measured: building the Objective; three Hessian-vector products; a CG solve on the
Gauss–Newton matrix (PSD; the random-init Hessian is indefinite) with ``CGCurvature(rtol=1e-3,
max_iter=25)``, one right-hand side (the full-data gradient), δ = 1. Reported per scenario: the peak over all phases, the bytes of the studied θ (M·4) and of
the frozen parameters, and their ratios. Nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from scalable_hbt import HessianOperator, Objective  # noqa: E402
from scalable_hbt.operators import GGNOperator  # noqa: E402
from scalable_hbt.curvature import CGCurvature  # noqa: E402
from scalable_hbt.memory import PeakMemory, format_bytes  # noqa: E402

HERE = Path(__file__)
ROOT = HERE.parent.parent
SCENARIOS = ("selected", "selected_4_layers", "selected_float64", "all")
N_LAYER, N_EMBD, VOCAB, N, T, BATCH = 16, 256, 1024, 8, 32, 4
DAMPING = 1.0


def layers_of(scenario: str) -> int:
    return 4 if scenario == "selected_4_layers" else N_LAYER


def build(n_layer: int = N_LAYER) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=N_EMBD, n_layer=n_layer, n_head=4, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg).float().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N, T), generator=gen)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def measure(scenario: str) -> dict:
    model, data = build(layers_of(scenario))
    params = None if scenario == "all" else [f"transformer.h.{layers_of(scenario) - 1}.*"]
    dtype = torch.float64 if scenario == "selected_float64" else torch.float32
    total = sum(p.numel() for p in model.parameters())  # the tied embedding/head counted once
    phases, peak = {}, 0
    start = None
    # One inference forward of a chunk first: the allocator keeps what it reaches (here ≈ 260 MiB) and
    # every later phase reuses it, so it is measured once and everything else is reported above it.
    with PeakMemory() as warm, torch.no_grad():
        model(**{k: data[k][:BATCH] for k in ("input_ids", "attention_mask")})

    def phase(name, fn):
        nonlocal peak, start
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        start = mem.start if start is None else start
        peak = max(peak, mem.peak)
        phases[name] = {"seconds": seconds, "peak_above_phase_start": max(mem.increase, 0),
                        "peak_above_baseline": max(mem.peak - start, 0)}
        return out

    obj = phase("objective", lambda: Objective(model, "causal_lm", data, params=params, dtype=dtype,
                                               batch_size=BATCH, progress=False))
    op = HessianOperator(obj)
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(2), dtype=dtype)
    phase("3 HVPs", lambda: [op.matvec(v) for _ in range(3)])

    def solve():
        cg = CGCurvature(rtol=1e-3, max_iter=25).fit(GGNOperator(obj))  # PSD: any δ > 0 will do
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore", RuntimeWarning)  # a budgeted solve may stop short
            cg.solve(obj.gradient()[:, None], DAMPING)
        return cg.diagnostics

    info = phase("CG solve", solve)
    M = obj.num_params
    selected_bytes = M * 4
    frozen_bytes = (total - M) * 4 if params is not None else 0
    peak_bytes = max(peak - start, 0)
    return {"scenario": scenario, "dtype": str(dtype), "params": params, "M": M, "model_params": total,
            "selected_bytes": selected_bytes, "frozen_bytes": frozen_bytes, "model_bytes": total * 4,
            "peak_bytes": peak_bytes, "phases": phases, "cg": {k: info[k] for k in ("iterations", "hvps")},
            "peak_over_selected": peak_bytes / selected_bytes,
            "peak_over_frozen": peak_bytes / frozen_bytes if frozen_bytes else None,
            "peak_over_model": peak_bytes / (total * 4), "inference_forward_bytes": max(warm.increase, 0),
            "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_scenario(scenario: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(HERE), "--scenario", scenario], capture_output=True, text=True,
                          timeout=3600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory scenario {scenario} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    rows = ["| scenario | dtype | M studied | frozen | objective | 3 HVPs | CG solve | peak | peak / studied θ | "
            "peak / frozen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ph = r["phases"]
        rows.append(
            f"| {r['scenario']} | {r['dtype'].split('.')[-1]} | {r['M']:,} ({format_bytes(r['selected_bytes'])}) | "
            f"{format_bytes(r['frozen_bytes'])} | {format_bytes(ph['objective']['peak_above_baseline'])} | "
            f"{format_bytes(ph['3 HVPs']['peak_above_baseline'])} | "
            f"{format_bytes(ph['CG solve']['peak_above_baseline'])} | {format_bytes(r['peak_bytes'])} | "
            f"{r['peak_over_selected']:.1f} | "
            + (f"{r['peak_over_frozen']:.2f} |" if r["peak_over_frozen"] is not None else "— |"))
    return "\n".join(rows)


def test_memory_of_a_selected_block(benchmark):
    import pytest

    pytest.importorskip("transformers")  # the test extra; the bench extra alone skips this benchmark
    results: dict[str, dict] = {}
    benchmark.pedantic(lambda: results.update({s: run_scenario(s) for s in SCENARIOS}), rounds=1, iterations=1)
    sel, f64, full = results["selected"], results["selected_float64"], results["all"]
    benchmark.extra_info.update(kind="memory_selection", results=list(results.values()),
                                table=table(list(results.values())))
    print("\n" + table(list(results.values())))
    shallow = results["selected_4_layers"]
    assert sel["frozen_bytes"] >= 10 * sel["selected_bytes"]          # the setting: a backbone ≥ 10× the block
    # building the Objective copies θ (the block), not the frozen backbone; with dtype=float64 it casts it
    assert sel["phases"]["objective"]["peak_above_baseline"] < 0.25 * sel["frozen_bytes"]
    assert f64["phases"]["objective"]["peak_above_baseline"] > 1.5 * sel["frozen_bytes"]
    # the whole run costs the same with a backbone 4× smaller, and a small part of studying everything
    assert sel["peak_bytes"] < 1.5 * shallow["peak_bytes"] + 8 * 2**20
    assert sel["peak_bytes"] < 0.25 * full["peak_bytes"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=SCENARIOS + ("table",), required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.scenario == "table":
        print(table([run_scenario(s) for s in SCENARIOS]))
        return 0
    print(json.dumps(measure(args.scenario)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
