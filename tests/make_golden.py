"""Writes tests/golden/<family>.npz: every method (and the options that change its path) on a
tiny seeded float64 model of every family, so that a refactor which changes a number is caught
by tests/test_golden.py.

Run from the repository root: ``python tests/make_golden.py [FAMILY ...] [--cases CASE,...]``
(open_clip needs the open_clip extra). Regenerate only for a change that is meant to change
numbers, and say which in the commit message. With ``--cases`` only those cases are recomputed;
every other case's arrays are copied from the existing file unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cliplens  # noqa: E402
from conftest import ADAPTER_FACTORIES, random_image  # noqa: E402
from families import FUSION_FACTORIES  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"
TEXTS = ["a red triangle", "a photo of a small dog", "cat"]
IMAGES = [random_image(1), random_image(2, size=(40, 64))]

#: (case name, method, explain keyword arguments)
CASES: list[tuple[str, str, dict]] = [
    ("chefer", "chefer", {}),
    ("chefer-all", "chefer", {"start_layer": 0}),
    ("chefer-probability", "chefer", {"target": "probability"}),
    ("chefer-contrast", "chefer", {"target": "contrast:cat"}),
    ("chefer-full", "chefer", {"resize": "full"}),
    ("legrad", "legrad", {}),
    ("legrad-mean-2", "legrad", {"pooling": "mean", "layers": 2}),
    ("legrad-probability", "legrad", {"target": "probability"}),
    ("legrad-full", "legrad", {"resize": "full"}),
    ("legrad-model-all", "legrad", {"pooling": "model", "layers": None, "correction": "off"}),
    ("rollout", "rollout", {}),
    ("rollout-1", "rollout", {"start_layer": 1}),
    ("raw_attention", "raw_attention", {}),
    ("raw_attention-0", "raw_attention", {"layer": 0}),
    ("gradcam", "gradcam", {}),
    ("gradcam-0", "gradcam", {"layer": 0}),
    ("sensitivity", "sensitivity", {}),
    ("sensitivity-gxi", "sensitivity", {"variant": "grad_x_input"}),
    ("sensitivity-pixel", "sensitivity", {"variant": "pixel_grad"}),
    ("sensitivity-iterative", "sensitivity", {"variant": "iterative", "steps": 3}),
    ("sensitivity-full", "sensitivity", {"variant": "pixel_grad", "resize": "full"}),
    ("grad_eclip", "grad_eclip", {}),
    ("decomposition", "decomposition", {}),
    ("decomposition-contrast", "decomposition", {"target": "contrast:0"}),
]

#: cases only fusion models run (beside CASES, where most dual-encoder methods are refused)
FUSION_CASES: list[tuple[str, str, dict]] = [
    ("chefer-reference", "chefer", {"degenerate_rows": "reference"}),
    ("gradcam-last", "gradcam", {"layer": -1}),
]

#: every family with the cases it runs
FAMILY_CASES = [(name, factory, CASES) for name, factory in ADAPTER_FACTORIES] + [
    (name, factory, CASES + FUSION_CASES) for name, factory in FUSION_FACTORIES
]


def run_case(adapter, method: str, kwargs: dict) -> dict[str, np.ndarray] | None:
    """The arrays of one case, flattened to names; None where the family refuses the method."""
    try:
        ex = cliplens.explain(adapter, IMAGES, TEXTS, method=method, **kwargs)
    except cliplens.InputError:
        return None
    out = {"logits": ex.logits, "probs": ex.probs, "target_values": ex.target_values}
    if ex.image_maps is not None:
        for b in range(len(IMAGES)):
            out[f"image_maps_{b}"] = np.asarray(ex.image_maps[b])
    if ex.token_scores is not None:
        out["token_scores"] = ex.token_scores
    for key, value in ex.extras.items():
        if isinstance(value, list):
            for b, v in enumerate(value):
                out[f"extra__{key}_{b}"] = np.asarray(v)
        else:
            out[f"extra__{key}"] = np.asarray(value)
    return out


def family_arrays(
    factory, cases, only: set[str] | None = None, old: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    adapter = factory(seed=0, dtype=torch.float64)
    arrays: dict[str, np.ndarray] = {}
    for case, method, kwargs in cases:
        if only is not None and case not in only:
            kept = {k: v for k, v in (old or {}).items() if k.split("/", 1)[0] == case}
            if not kept:
                raise SystemExit(f"case {case} is not in the existing golden file: regenerate it too")
            arrays.update(kept)
            continue
        result = run_case(adapter, method, kwargs)
        if result is None:
            arrays[f"{case}/refused"] = np.array(True)
            continue
        for key, value in result.items():
            arrays[f"{case}/{key}"] = np.asarray(value, dtype=np.float64)
    return arrays


def main(argv: list[str]) -> int:
    GOLDEN.mkdir(exist_ok=True)
    only = None
    if "--cases" in argv:
        i = argv.index("--cases")
        only = set(argv[i + 1].split(","))
        argv = argv[:i] + argv[i + 2 :]
        unknown = only - {c[0] for c in CASES + FUSION_CASES}
        if unknown:
            raise SystemExit(f"unknown cases: {sorted(unknown)}")
    wanted = set(argv) or {name for name, _, _ in FAMILY_CASES}
    for name, factory, cases in FAMILY_CASES:
        if name not in wanted:
            continue
        old = None
        if only is not None:
            with np.load(GOLDEN / f"{name}.npz") as z:
                old = {k: z[k] for k in z.files}
        arrays = family_arrays(factory, cases, only, old)
        np.savez_compressed(GOLDEN / f"{name}.npz", **arrays)
        print(f"{name}: {len(arrays)} arrays")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
