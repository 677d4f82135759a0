"""Golden files: every method on a tiny seeded float64 model of every family gives the numbers
committed in tests/golden/ (written by tests/make_golden.py before the consolidation), so a
refactor that changes a number fails here. A case may gain arrays (a bug fix that stops dropping
them) but never lose or change one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from make_golden import FAMILY_CASES, FUSION_CASES, run_case

GOLDEN = Path(__file__).resolve().parent / "golden"
FAMILIES = [
    # the open_clip family runs in the open_clip suite (`pytest -m open_clip`, its own environment)
    pytest.param((name, factory), id=name, marks=[pytest.mark.open_clip] if name == "open_clip" else [])
    for name, factory, _ in FAMILY_CASES
    if (GOLDEN / f"{name}.npz").is_file()
]
#: every case of any family (a family's golden file holds the cases it runs)
CASES = {case: (method, kwargs) for _, _, cases in FAMILY_CASES for case, method, kwargs in cases}


@pytest.fixture(scope="module", params=FAMILIES)
def golden_family(request):
    name, factory = request.param
    with np.load(GOLDEN / f"{name}.npz") as z:
        golden = {k: z[k] for k in z.files}
    return factory(seed=0, dtype=torch.float64), golden


@pytest.mark.parametrize("case", list(CASES))
def test_numbers_unchanged(golden_family, case):
    adapter, golden = golden_family
    method, kwargs = CASES[case]
    expected = {k.split("/", 1)[1]: v for k, v in golden.items() if k.split("/", 1)[0] == case}
    if case in {c for c, _, _ in FUSION_CASES} and not adapter.fusion:
        pytest.skip(f"{case} is a fusion-model case")
    assert expected, f"no golden arrays for case {case}"
    got = run_case(adapter, method, kwargs)
    if "refused" in expected:
        assert got is None, f"{case} was refused when the golden files were written"
        return
    assert got is not None, f"{case} is refused now"
    missing = sorted(set(expected) - set(got))
    assert not missing, f"{case} lost arrays: {missing}"
    for key, want in expected.items():
        have = np.asarray(got[key], dtype=np.float64)
        assert have.shape == want.shape, key
        assert np.array_equal(np.isnan(have), np.isnan(want)), key
        if "delta_" in key:  # completeness errors are rounding noise: both must stay at it
            assert np.nanmax(have) < 1e-10 and np.nanmax(want) < 1e-10, key
            continue
        scale = np.nanmax(np.abs(want)) if np.isfinite(want).any() else 1.0
        # float64, but the tiny models' sharpened attention amplifies rounding: the same code
        # differs by up to 1.5e-7 of an array's scale between 1 and 2 threads. A refactor
        # mistake (a float32 step, a wrong index, a changed default) is far above 1e-5.
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * (scale + 1e-300), err_msg=key)
