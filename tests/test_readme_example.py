"""The Hugging Face example of README.md ("Use as a library"), run as written: the code block after
the marker ``<!-- tested by tests/test_readme_example.py ... -->`` is executed with the imports the
README's first example has, and what its comments promise is checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from scalable_hbt import Objective, Toolbox

pytest.importorskip("transformers")
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- tested by tests/test_readme_example\.py[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost the marked Hugging Face example"
    return match.group(1)


def test_readme_hugging_face_example_runs_as_written():
    torch.manual_seed(0)
    ns = {"torch": torch, "Objective": Objective, "Toolbox": Toolbox}
    exec(compile(readme_block(), str(README), "exec"), ns)  # noqa: S102 - our own README
    I, s, top, obj, tb = ns["I"], ns["s"], ns["top"], ns["obj"], ns["tb"]
    assert obj.param_names[0].startswith("transformer.h.1.") and all(k.startswith("transformer.h.1.")
                                                                        for k in obj.param_names)
    assert tb.diagnostics["curvature"] == "ggn" and tb.inverse.diagnostics["converged"]
    assert I.shape == (4, 16) and s.shape == (16,) and torch.isfinite(I).all()
    assert (s > 0).all()  # g_iᵀ (G + δI)⁻¹ g_i / n with G PSD
    for key in ("helpful", "harmful"):
        assert top[f"{key}_index"].shape == (4, 3)
    values, index = I.topk(3, dim=1)
    assert torch.equal(top["helpful_index"], index)
    torch.testing.assert_close(top["helpful_score"], values, rtol=1e-4, atol=1e-7)
    # the test points are training sequences 0..3: each one's self-influence is its own influence entry
    torch.testing.assert_close(torch.diagonal(I[:, :4]), s[:4], rtol=1e-4, atol=1e-7)
