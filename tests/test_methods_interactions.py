"""Token x patch interactions: entries against a float64 loop oracle, exact completeness,
marginals equal to the decomposition's maps, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
from conftest import hf_clip_factory, hf_siglip_factory, random_image
from oracles import oracle_interactions

TEXTS = ["a red triangle", "cat and dog"]
IMAGES = [random_image(5), random_image(6, size=(40, 56))]


@pytest.fixture(scope="module")
def adapter64():
    return hf_clip_factory(seed=1, dtype=torch.float64)


def test_entries_match_the_float64_oracle(adapter64):
    ex = cliplens.explain(adapter64, IMAGES, TEXTS, method="interactions")
    ref = oracle_interactions(adapter64, IMAGES, TEXTS)
    for b in range(len(IMAGES)):
        for p in range(len(TEXTS)):
            want = ref[b, p]
            have = np.asarray(ex.extras["interactions"][b][p])[: want.shape[0]]
            np.testing.assert_allclose(have, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
            assert np.isnan(np.asarray(ex.extras["interactions"][b][p])[want.shape[0] :]).all()


def test_parts_sum_to_the_logit_and_marginals_are_the_decomposition(adapter64):
    ex = cliplens.explain(adapter64, IMAGES, TEXTS, method="interactions")
    dec = cliplens.explain(adapter64, IMAGES, TEXTS, method="decomposition")
    assert np.max(ex.extras["delta_similarity"]) < 1e-10
    for b in range(len(IMAGES)):
        for p in range(len(TEXTS)):
            M = np.asarray(ex.extras["interactions"][b][p])
            total = (
                np.nansum(M)
                + np.nansum(ex.extras["interactions_image_const"][b, p])
                + np.asarray(ex.extras["interactions_text_const"][b][p]).sum()
                + ex.extras["interactions_const"][b, p]
            )
            assert total == pytest.approx(ex.logits[b, p], rel=1e-10)
            np.testing.assert_allclose(ex.grid_map(b, p), dec.grid_map(b, p), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ex.token_scores, dec.token_scores, rtol=1e-9, atol=1e-12)


def test_float32_completeness():
    adapter = hf_clip_factory(seed=2)
    ex = cliplens.explain(adapter, IMAGES, TEXTS, method="interactions")
    assert np.max(ex.extras["delta_similarity"]) < 1e-4


def test_refusals_are_one_line():
    adapter = hf_clip_factory(seed=0)
    with pytest.raises(cliplens.InputError, match="not bilinear"):
        cliplens.explain(adapter, IMAGES[:1], TEXTS, method="interactions", target="probability")
    with pytest.raises(cliplens.InputError, match="explain both"):
        cliplens.explain(adapter, IMAGES[:1], TEXTS, method="interactions", towers=("image",))
    with pytest.raises(cliplens.InputError, match="pools with an attention head"):
        cliplens.explain(hf_siglip_factory(seed=0), IMAGES[:1], TEXTS, method="interactions")


@pytest.mark.parametrize("chunk", [64, 5])
def test_jacobian_interactions_match_the_float64_oracle(adapter64, chunk):
    from oracles import oracle_jacobian_interactions

    ex = cliplens.explain(adapter64, IMAGES, TEXTS, method="jacobian_interactions", chunk=chunk)
    ref = oracle_jacobian_interactions(adapter64, IMAGES, TEXTS)
    for b in range(len(IMAGES)):
        for p in range(len(TEXTS)):
            want = ref[b, p]
            T = want.shape[0]
            have = np.asarray(ex.extras["interactions"][b][p])
            np.testing.assert_allclose(have[:T], want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
            assert np.isnan(have[T:]).all()
            np.testing.assert_allclose(ex.grid_map(b, p), want.sum(0), rtol=1e-8, atol=1e-10 * np.abs(want).max())


def test_word_map_sums_the_words_token_rows(adapter64):
    ex = cliplens.explain(adapter64, IMAGES[:1], ["a red triangle and a blue square"], method="interactions")
    matrix = ex.interaction_matrix(0, 0)
    idx = [i for i, t in enumerate(ex.tokens[0]) if t in ("blue", "square")]
    assert len(idx) == 2
    np.testing.assert_allclose(ex.word_map(0, 0, "Blue  square"), matrix[idx].sum(0), rtol=1e-12)
    np.testing.assert_allclose(ex.word_map(0, 0, idx), matrix[idx].sum(0), rtol=1e-12)
    with pytest.raises(cliplens.InputError, match="not among"):
        ex.word_map(0, 0, "green")
    with pytest.raises(cliplens.InputError, match="do not fit"):
        ex.word_map(0, 0, [99])
    chefer = cliplens.explain(adapter64, IMAGES[:1], ["a cat"], method="chefer")
    with pytest.raises(cliplens.InputError, match="no token x patch"):
        chefer.word_map(0, 0, "cat")


def test_explain_page_shows_word_maps_and_the_matrix(tmp_path):
    """The CLI writes one overlay per content token, the matrix picture, interactions.npz with
    the matrices, and chips that name their overlay."""
    import json

    from cliplens.cli import main

    img = tmp_path / "scene.png"
    random_image(7, size=(64, 48)).save(img)
    out = tmp_path / "out"
    assert main(["explain", str(img), "--model", "shapes", "--method", "interactions",
                 "--text", "a red circle and a blue star", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    words = sorted(p.name for p in out.glob("*__w*.png"))
    assert len(words) == 7  # a red circle and a blue star: 7 content tokens
    for name in words:
        assert f'data-img="{name}"' in page
    assert len(list(out.glob("*__matrix.png"))) == 1 and "token x patch matrix" in page
    res = json.loads((out / "results.json").read_text())
    assert res["interactions"]["file"] == "interactions.npz"
    with np.load(out / "interactions.npz") as z:
        m = z["image_0"]
    ex_tokens = res["tokens"][0]
    assert m.shape[:2] == (1, len(ex_tokens)) or m.shape[1] >= len(ex_tokens)
    # the saved matrix is the explanation's (float32)
    ex = cliplens.explain("shapes", str(img), ["a red circle and a blue star"], method="interactions")
    T = len(ex.tokens[0])
    np.testing.assert_allclose(m[0, :T], ex.interaction_matrix(0, 0), rtol=1e-5, atol=1e-6)
