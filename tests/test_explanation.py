"""Explanation: JSON schema, save/load round trips in both per-image forms, and every damaged
or inconsistent saved result refused with one ResultError line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cliplens.errors import CliplensError, InputError
from cliplens.explanation import Explanation, ResultError
from cliplens.images import Geometry

B, P, T = 2, 3, 5


def make(grids=((2, 3), (2, 3)), *, target="logit", per_image_extras=False, seed=0) -> Explanation:
    """A hand-built explanation of len(grids) images x 3 prompts; the images differ in size."""
    rng = np.random.default_rng(seed)
    b = len(grids)
    maps = [rng.normal(size=(P, gh, gw)) for gh, gw in grids]
    uniform = len(set(grids)) == 1
    layer = [rng.normal(size=(P, 4, gh, gw)) for gh, gw in grids]
    scores = rng.normal(size=(b, P, T))
    scores[:, :, 4] = np.nan  # padding
    scores[:, 0, 3] = np.nan  # prompt 0 is one token shorter
    content = np.zeros((P, T), dtype=bool)
    content[:, 1:3] = True
    content[1:, 3] = True
    tokens = [
        ["<s>", "a", "cat", "</s>"],
        ["<s>", "a", "red", "dog", "</s>"],
        ["<s>", "two", "big", "cars", "</s>"],
    ]
    logits = rng.normal(size=(b, P)) * 10
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sizes = [(30 + 10 * i, 20 + 5 * i) for i in range(b)]  # (width, height)
    return Explanation(
        method="chefer",
        target=target,
        texts=["a cat", "a red dog", "two big cars"],
        image_maps=np.stack(maps) if uniform else maps,
        token_scores=scores,
        tokens=tokens,
        content=content,
        truncated=[False, False, True],
        logits=logits,
        probs=probs,
        target_values=logits.copy(),
        geometries=[Geometry(w, h, 1.0, 1.0, (0.0, 0.0), (w, h)) for w, h in sizes],
        images=[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes],
        extras={
            "layer_maps": np.stack(layer) if uniform and not per_image_extras else layer,
            "delta": rng.normal(size=(b, P)),
        },
        meta={"model": "tiny", "options": {"start_layer": 0}, "scale": np.float32(2.5)},
    )


def first_prompt_only(ex: Explanation) -> Explanation:
    """``ex`` cut to its first prompt, probabilities of a softmax over that one prompt (1)."""
    B = ex.shape[0]
    return Explanation(
        **{
            **ex.__dict__,
            "texts": ex.texts[:1],
            "image_maps": ex.image_maps[:, :1],
            "token_scores": ex.token_scores[:, :1],
            "tokens": ex.tokens[:1],
            "content": ex.content[:1],
            "truncated": ex.truncated[:1],
            "logits": ex.logits[:, :1],
            "probs": np.ones((B, 1)),
            "target_values": np.ones((B, 1)) if ex.target == "probability" else ex.logits[:, :1],
        }
    )


def assert_same(a: Explanation, b: Explanation) -> None:
    assert (a.method, a.target, a.texts, a.tokens, a.truncated) == (
        b.method,
        b.target,
        b.texts,
        b.tokens,
        b.truncated,
    )
    assert type(a.image_maps) is type(b.image_maps)
    for x, y in zip(a.image_maps, b.image_maps):
        np.testing.assert_array_equal(x, y)
    for name in ("token_scores", "content", "logits", "probs", "target_values"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.geometries == b.geometries
    for x, y in zip(a.images, b.images):
        np.testing.assert_array_equal(x, y)
    assert set(a.extras) == set(b.extras)
    for key in a.extras:
        assert type(a.extras[key]) is type(b.extras[key]), key
        for i in range(len(a.images)):
            np.testing.assert_array_equal(a.extra(key, i), b.extra(key, i))


@pytest.mark.parametrize(
    "grids, per_image",
    [(((2, 3), (2, 3)), False), (((2, 3), (3, 2)), True), (((2, 3), (2, 3)), True)],
    ids=["one-array", "mixed-grids", "lists-of-equal-grids"],
)
def test_save_load_round_trip(tmp_path, grids, per_image):
    ex = make(grids, per_image_extras=per_image)
    assert isinstance(ex.extras["layer_maps"], list) == per_image
    back = Explanation.load(ex.save(tmp_path / "r"))
    assert_same(ex, back)
    assert back.meta["scale"] == 2.5  # numpy scalars in meta are written as plain numbers
    assert (
        Explanation.load(tmp_path / "r" / "explanation.json").texts == ex.texts
    )  # a file of the folder works too
    assert not list((tmp_path / "r").glob(".*"))  # no temporary files left


@pytest.mark.parametrize("grids", [((2, 3), (2, 3)), ((2, 3), (3, 2))], ids=["one-array", "mixed-grids"])
def test_to_dict_is_strict_json_with_every_pair(grids):
    ex = make(grids, per_image_extras=True)
    d = ex.to_dict()
    json.dumps(d, allow_nan=False)  # NaN written as null: strict JSON
    assert d["shape"] == [2, P] and d["texts"] == ex.texts and d["tokens"] == ex.tokens
    assert d["content"][0] == [False, True, True, False]  # trimmed to the prompt's own tokens
    assert [im["grid"] for im in d["images"]] == [list(g) for g in grids]
    assert [(im["width"], im["height"]) for im in d["images"]] == [(30, 20), (40, 25)]
    assert d["images"][1]["extras"]["layer_maps"]["values"] == ex.extra("layer_maps", 1).tolist()
    assert d["images"][1]["extras"]["delta"]["shape"] == [P]
    assert [(e["image_index"], e["prompt_index"]) for e in d["pairs"]] == [
        (b, p) for b in range(2) for p in range(P)
    ]
    e = d["pairs"][4]  # image 1, prompt 1
    assert e["prompt"] == "a red dog" and e["logit"] == ex.logits[1, 1] and e["probability"] == ex.probs[1, 1]
    assert e["grid_map"] == ex.grid_map(1, 1).tolist()
    assert (e["map_min"], e["map_max"]) == (ex.grid_map(1, 1).min(), ex.grid_map(1, 1).max())
    assert [t["token"] for t in e["tokens"]] == ["a", "red", "dog"]
    assert e["tokens"][2]["score"] == ex.token_scores[1, 1, 3]
    assert d["pairs"][0]["token_scores"][3] is None  # the NaN of prompt 0's missing token
    assert len(d["pairs"][0]["token_scores"]) == 4
    assert d["pairs"][2]["truncated"] is True and d["pairs"][0]["truncated"] is False
    assert not any("image" in k and k != "image_index" for k in e)  # no pixel arrays
    assert d["meta"]["options"] == {"start_layer": 0}


def test_to_dict_summarises_large_extras():
    ex = make()
    d = ex.to_dict(extras_limit=10)
    big = d["images"][0]["extras"]["layer_maps"]
    assert "values" not in big and big["shape"] == [P, 4, 2, 3]
    want = ex.extra("layer_maps", 0)
    assert big["summary"]["max"] == pytest.approx(want.max()) and big["summary"]["nonfinite"] == 0
    assert d["images"][0]["extras"]["delta"]["values"] == ex.extra("delta", 0).tolist()  # small ones stay


def test_concat_keeps_mixed_grids_per_image():
    a, b = make(((2, 3),), seed=1), make(((3, 2),), seed=2)
    joined = Explanation.concat([a, b])
    assert isinstance(joined.image_maps, list) and isinstance(joined.extras["layer_maps"], list)
    assert isinstance(joined.extras["delta"], np.ndarray) and joined.extras["delta"].shape == (2, P)
    np.testing.assert_array_equal(joined.grid_map(1, 2), b.grid_map(0, 2))
    np.testing.assert_array_equal(joined.extra("layer_maps", 1), b.extra("layer_maps", 0))
    same = Explanation.concat([a, make(((2, 3),), seed=3)])
    assert isinstance(same.image_maps, np.ndarray) and same.image_maps.shape == (2, P, 2, 3)
    assert same.logits.shape == (2, P) and len(same.images) == 2


def test_constant_targets_and_flat_maps():
    ex = make(target="contrast:1")
    assert [ex.constant_reason(p) is not None for p in range(P)] == [False, True, False]
    assert not ex.flat_pairs().any()
    maps = ex.image_maps.copy()
    maps[1, 2] = 0.3 + 1e-9 * np.arange(6).reshape(2, 3)  # rounding noise around a constant
    noisy = Explanation(**{**ex.__dict__, "image_maps": maps})
    assert noisy.flat_pairs().tolist() == [[False] * 3, [False, False, True]]
    single = first_prompt_only(make(target="probability"))
    assert single.probability == "softmax"
    assert "softmax over one prompt" in single.constant_reason(0)
    sig = Explanation(**{**single.__dict__, "probs": 1 / (1 + np.exp(-single.logits)), "meta": {}})
    assert sig.probability == "sigmoid" and sig.constant_reason(0) is None


# ---- damaged saved results -------------------------------------------------------------------
def _edit_json(folder: Path, change) -> None:
    info = json.loads((folder / "explanation.json").read_text())
    change(info)
    (folder / "explanation.json").write_text(json.dumps(info))


def _edit_npz(folder: Path, change) -> None:
    with np.load(folder / "explanation.npz") as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(folder / "explanation.npz", **arrays)


def _drop_geometry(info):
    info["geometries"].pop()


def _add_prompt(info):
    info["texts"].append("x")
    info["tokens"].append(["x"])
    info["truncated"].append(False)


DAMAGE = {
    "no folder": (lambda f: f.rename(f.with_name("gone")), "no such folder"),
    "no json": (lambda f: (f / "explanation.json").unlink(), "no explanation.json"),
    "no npz": (lambda f: (f / "explanation.npz").unlink(), "explanation.npz is missing"),
    "json not json": (lambda f: (f / "explanation.json").write_text("{oops"), "not valid JSON"),
    "json a list": (lambda f: (f / "explanation.json").write_text("[1, 2]"), "not an object"),
    "json not utf-8": (lambda f: (f / "explanation.json").write_bytes(b"\xff\xfe{"), "cannot be read"),
    "format 2": (lambda f: _edit_json(f, lambda i: i.update(format=2)), "unsupported explanation format 2"),
    "no format": (lambda f: _edit_json(f, lambda i: i.pop("format")), "unsupported explanation format None"),
    "no method": (lambda f: _edit_json(f, lambda i: i.pop("method")), "no 'method'"),
    "texts a string": (lambda f: _edit_json(f, lambda i: i.update(texts="a cat")), "'texts'"),
    "texts of numbers": (lambda f: _edit_json(f, lambda i: i.update(texts=[1, 2, 3])), "'texts'"),
    "tokens short": (lambda f: _edit_json(f, lambda i: i["tokens"].pop()), "token lists"),
    "geometry damaged": (
        lambda f: _edit_json(f, lambda i: i["geometries"][0].pop("crop")),
        "geometry of image 0",
    ),
    "extras form": (lambda f: _edit_json(f, lambda i: i.update(extras={"delta": "scalar"})), "'extras'"),
    "npz garbage": (lambda f: (f / "explanation.npz").write_bytes(b"PK\x03\x04 not a zip"), "damaged"),
    "npz truncated": (
        lambda f: (f / "explanation.npz").write_bytes((f / "explanation.npz").read_bytes()[:300]),
        "damaged",
    ),
    "logits missing": (lambda f: _edit_npz(f, lambda a: a.pop("logits")), "no 'logits'"),
    "logits shape": (
        lambda f: _edit_npz(f, lambda a: a.update(logits=a["logits"][:, :2])),
        "logits has shape",
    ),
    "logits text": (
        lambda f: _edit_npz(f, lambda a: a.update(logits=a["logits"].astype(str))),
        "logits holds",
    ),
    "B disagrees": (lambda f: _edit_json(f, _drop_geometry), "describes 1 image(s) x 3 prompt(s)"),
    "P disagrees": (lambda f: _edit_json(f, _add_prompt), "describes 2 image(s) x 4 prompt(s)"),
    "maps shape": (
        lambda f: _edit_npz(f, lambda a: a.update(image_maps=a["image_maps"][:1])),
        "image_maps has shape",
    ),
    "maps flag": (lambda f: _edit_json(f, lambda i: i.update(uniform_grid=False)), "grids differ"),
    "scores shape": (
        lambda f: _edit_npz(f, lambda a: a.update(token_scores=a["token_scores"][..., :3])),
        "token_scores",
    ),
    "content type": (
        lambda f: _edit_npz(f, lambda a: a.update(content=a["content"].astype(float))),
        "content holds",
    ),
    "image missing": (lambda f: _edit_npz(f, lambda a: a.pop("image_1")), "no 'image_1'"),
    "image size": (lambda f: _edit_npz(f, lambda a: a.update(image_0=a["image_0"][:5])), "image_0 has shape"),
    "extra missing": (lambda f: _edit_npz(f, lambda a: a.pop("extra__delta")), "no 'extra__delta'"),
    "extra short": (
        lambda f: _edit_npz(f, lambda a: a.update(extra__delta=a["extra__delta"][:1])),
        "extra 'delta'",
    ),
    "stray array": (lambda f: _edit_npz(f, lambda a: a.update(surprise=np.zeros(2))), "surprise"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_load_refuses_damage_with_one_line(tmp_path, damage):
    folder = make().save(tmp_path / "saved")
    hurt, fragment = DAMAGE[damage]
    hurt(folder)
    with pytest.raises(ResultError) as info:
        Explanation.load(folder)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert isinstance(info.value, InputError) and isinstance(info.value, CliplensError)


def test_load_refuses_damaged_per_image_forms(tmp_path):
    folder = make(((2, 3), (3, 2)), per_image_extras=True).save(tmp_path / "saved")
    _edit_npz(folder, lambda a: a.pop("extra__layer_maps__1"))
    with pytest.raises(ResultError, match="extra__layer_maps__1"):
        Explanation.load(folder)
    folder = make(((2, 3), (3, 2))).save(tmp_path / "saved2")
    _edit_npz(folder, lambda a: a.update(image_maps_1=a["image_maps_1"][:2]))
    with pytest.raises(ResultError, match="image_maps_1 has shape"):
        Explanation.load(folder)


def test_reads_a_folder_written_before_extras_forms(tmp_path):
    folder = make().save(tmp_path / "old")
    _edit_json(folder, lambda i: i.pop("extras"))
    assert set(Explanation.load(folder).extras) == {"layer_maps", "delta"}


@pytest.mark.parametrize("method", ["legrad", "decomposition", "gradcam"])
def test_real_explanation_round_trip_and_json(tmp_path, tiny_adapter, method):
    from cliplens import explain
    from conftest import random_image

    images = [random_image(0, (48, 40)), random_image(1, (40, 64))]
    ex = explain(tiny_adapter, images, ["a cat", "a red dog"], method=method, resize="full")
    assert_same(ex, Explanation.load(ex.save(tmp_path / method)))
    d = json.loads(json.dumps(ex.to_dict(), allow_nan=False))
    assert [im["grid"] for im in d["images"]] == [list(ex.grid_map(b, 0).shape) for b in range(2)]
    assert d["method"] == method and len(d["pairs"]) == 4
