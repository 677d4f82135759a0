"""The result of :func:`cliplens.explain`: raw maps and scores with everything needed to read them.

Letters: B images, P prompts, T tokens, Gh x Gw patch grid. An array whose shape depends on
the image (the image maps and the extras when the images of a call have different grids,
``resize="full"``) comes either as one array with a leading B axis or as a list of B arrays,
one per image; every reader below accepts both.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InputError
from .images import Geometry

FORMAT_VERSION = 1

#: A per-image extra with more values than this is summarised in :meth:`Explanation.to_dict`
#: (shape, min, max, mean) instead of written out.
EXTRA_VALUES_LIMIT = 20_000

#: A pair's map counts as flat when its range is at most this fraction of the largest
#: magnitude among all maps of the call (float32 rounding noise is about 1e-7 of it).
FLAT_RTOL = 1e-5

PerImage = np.ndarray | list[np.ndarray]


class ResultError(InputError):
    """A saved explanation that cannot be read: missing files, an unsupported format, or
    contents that are damaged or do not fit together."""


def _per_image(value: PerImage, b: int) -> np.ndarray:
    return np.asarray(value[b])


def _jsonable(a: np.ndarray) -> Any:
    """Nested lists with None where a float is NaN or infinite (strict JSON has neither)."""
    a = np.asarray(a)
    if a.dtype.kind in "biu":
        return a.tolist()
    a = a.astype(np.float64)
    out = a.astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()


def _finite_range(a: np.ndarray) -> tuple[float, float] | None:
    a = np.asarray(a, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


@dataclass(frozen=True)
class Explanation:
    """Explanations of B images x P prompts by one method.

    Attributes:
        method, target: what produced it and which scalar was explained.
        texts: the P prompts.
        image_maps: (B, P, Gh, Gw) float, raw and signed, in the method's own units. When the
            images of a call have different grids (``resize="full"``) a list of B arrays
            (P, Gh_b, Gw_b) instead.
        token_scores: (B, P, T) float, raw, NaN on padding; None if the method has no text side.
        tokens: per prompt, the decoded token strings (T_p of them, start/end markers included).
        content: (P, T) bool, the tokens between the start and end markers.
        truncated: per prompt, whether it was cut to the model's text context.
        logits, probs, target_values: (B, P).
        geometries: per image, how the original maps onto the model input.
        images: per image, the original as an (H, W, 3) uint8 array (for overlays).
        extras: method-specific arrays (for example per-layer maps), each with a leading B
            axis, or a list of B arrays when its shape differs between images.
        meta: model name, options, versions.
    """

    method: str
    target: str
    texts: list[str]
    image_maps: PerImage | None
    token_scores: np.ndarray | None
    tokens: list[list[str]]
    content: np.ndarray
    truncated: list[bool]
    logits: np.ndarray
    probs: np.ndarray
    target_values: np.ndarray
    geometries: list[Geometry]
    images: list[np.ndarray]
    extras: dict[str, PerImage] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, P)."""
        return self.logits.shape  # type: ignore[return-value]

    # ---- reading the maps --------------------------------------------------------------
    def grid_map(self, b: int, p: int) -> np.ndarray:
        """(Gh, Gw) raw map of image b, prompt p."""
        if self.image_maps is None:
            raise ValueError(f"method {self.method!r} gave no image map")
        return np.asarray(self.image_maps[b][p])

    def map_on_original(self, b: int, p: int) -> np.ndarray:
        """The raw map resampled onto the original image b, (H, W); NaN where the model saw
        nothing (outside the centre crop)."""
        return self.geometries[b].grid_to_original(self.grid_map(b, p))

    def map_range(self, b: int, p: int) -> tuple[float, float] | None:
        """(min, max) of the raw grid map of image b, prompt p; None without finite values."""
        if self.image_maps is None:
            return None
        return _finite_range(self.grid_map(b, p))

    def extra(self, key: str, b: int) -> np.ndarray:
        """Extra ``key`` of image b (its leading B axis taken off), whichever form it is in."""
        return _per_image(self.extras[key], b)

    def interaction_matrix(self, b: int, p: int) -> np.ndarray:
        """(T_p, Gh, Gw) token x patch interactions of pair (b, p), one row per token of prompt p
        (start and end markers included), from a method that gives them (``interactions``,
        ``jacobian_interactions``)."""
        if "interactions" not in self.extras:
            raise InputError(
                f"method {self.method!r} gives no token x patch interactions; use method='interactions'"
            )
        return np.asarray(self.extra("interactions", b)[p][: len(self.tokens[p])])

    def word_matrix(self, b: int, p: int) -> np.ndarray:
        """(T_p, Gh, Gw): one map per token of prompt p on image b, from a method that gives them:
        the token x patch interactions (``interactions``, ``jacobian_interactions``) or the
        per-word maps of LAVIS's cross-attention Grad-CAM (``gradcam`` on BLIP, NaN outside the
        content tokens)."""
        if "interactions" in self.extras:
            return self.interaction_matrix(b, p)
        if "word_maps" in self.extras:
            return np.asarray(self.extra("word_maps", b)[p][: len(self.tokens[p])])
        raise InputError(f"method {self.method!r} gives no per-word maps; use method='interactions'")

    def word_map(self, b: int, p: int, word: str | Sequence[int]) -> np.ndarray:
        """(Gh, Gw) map of one word or phrase of prompt p on image b: the sum of its tokens'
        rows of :meth:`interaction_matrix`. ``word`` is text (found among the prompt's tokens,
        case and spaces ignored; a word split into sub-word tokens is found whole) or token
        indices. :meth:`Geometry.grid_to_original` puts it on the original image."""
        from .tokens import find_phrase

        matrix = self.interaction_matrix(b, p)
        if isinstance(word, str):
            idx = find_phrase(self.tokens[p], word)
        else:
            idx = [int(i) for i in word]
            bad = [i for i in idx if not 0 <= i < len(self.tokens[p])]
            if not idx or bad:
                raise InputError(f"token indices {idx} do not fit prompt {p}'s {len(self.tokens[p])} tokens")
        return matrix[idx].sum(0)

    def token_table(self, b: int, p: int, *, content_only: bool = True) -> list[tuple[str, float]]:
        """(token, raw score) for prompt p with image b."""
        if self.token_scores is None:
            raise ValueError(f"method {self.method!r} gave no token scores")
        out = []
        for t, tok in enumerate(self.tokens[p]):
            if content_only and not self.content[p, t]:
                continue
            out.append((tok, float(self.token_scores[b, p, t])))
        return out

    def normalised_tokens(self, b: int, p: int) -> list[tuple[str, float]]:
        """Content-token scores divided by their sum (the Chefer reference's display)."""
        table = self.token_table(b, p)
        total = sum(s for _, s in table)
        return [(t, s / total if total else 0.0) for t, s in table]

    def overlay(self, b: int, p: int, *, max_side: int | None = None, **kwargs) -> Image.Image:
        """The original image b with prompt p's map over it (see :func:`cliplens.viz.overlay`).
        ``max_side``: build it at display size, the longest side at most this many pixels (the
        image is shrunk first and the map resampled straight onto the small image, so the memory
        does not grow with the source); None: full size."""
        from .viz import overlay

        return overlay(*self.display_pair(b, self.grid_map(b, p), max_side), **kwargs)

    def display_pair(self, b: int, grid: np.ndarray, max_side: int | None) -> tuple[Image.Image, np.ndarray]:
        """(image b at display size, ``grid`` resampled onto it as float32) for an overlay."""
        from .images import display_size

        img = Image.fromarray(np.asarray(self.images[b]))
        geometry = self.geometries[b]
        w, h = display_size(img.width, img.height, max_side)
        if (w, h) != img.size:
            img = img.resize((w, h), resample=Image.BOX, reducing_gap=3.0)
            geometry = geometry.resized(w, h)
        return img, geometry.grid_to_original(grid, dtype=np.float32)

    # ---- what can be read from a pair --------------------------------------------------
    @property
    def probability(self) -> str:
        """How ``probs`` were made: ``"softmax"`` over the prompts or a per-pair ``"sigmoid"``.
        Taken from ``meta["probability"]`` when the producer recorded it, else from the model
        family, else from the numbers (probabilities equal to the sigmoid of the logits)."""
        kind = self.meta.get("probability")
        if kind in ("softmax", "sigmoid"):
            return kind
        if self.meta.get("family") in ("hf-siglip", "hf-siglip2"):
            return "sigmoid"
        if self.shape[1] == 1 and np.all(self.probs == 1.0):
            return "softmax"
        sig = 1.0 / (1.0 + np.exp(-np.asarray(self.logits, dtype=np.float64)))
        return "sigmoid" if np.allclose(self.probs, sig, rtol=1e-5, atol=1e-7) else "softmax"

    def constant_reason(self, p: int) -> str | None:
        """Why prompt p's target is the same number whatever the image (so there is nothing to
        explain), or None when it is not constant by construction."""
        P = self.shape[1]
        if self.target.startswith("contrast:"):
            versus = self.target.partition(":")[2]
            if versus.lstrip("-").isdigit() and int(versus) % P == p:
                return "the contrast of a prompt with itself is 0 by construction"
        if self.target == "probability" and P == 1 and self.probability == "softmax":
            return "a softmax over one prompt is 1 by construction"
        return None

    def flat_pairs(self, rtol: float = FLAT_RTOL) -> np.ndarray:
        """(B, P) bool: pairs whose map is (nearly) constant, its range at most ``rtol`` of the
        largest magnitude among all maps of this explanation (or no finite value at all):
        what a display would stretch there is rounding noise, not an explanation."""
        B, P = self.shape
        flat = np.zeros((B, P), dtype=bool)
        if self.image_maps is None:
            return flat
        ranges = {(b, p): self.map_range(b, p) for b in range(B) for p in range(P)}
        scale = max((max(abs(r[0]), abs(r[1])) for r in ranges.values() if r is not None), default=0.0)
        for (b, p), r in ranges.items():
            flat[b, p] = r is None or r[1] - r[0] <= rtol * scale
        return flat

    # ---- combining ---------------------------------------------------------------------
    @classmethod
    def concat(cls, parts: Sequence[Explanation]) -> Explanation:
        """One explanation of all images of ``parts`` (calls with the same prompts, method and
        target, for example the batches of a long list of images). Per-image arrays whose
        shapes differ between the parts become lists of B arrays."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        if len(parts) == 1:
            return first
        for ex in parts[1:]:
            if (ex.method, ex.target, ex.texts) != (first.method, first.target, first.texts):
                raise ValueError("explanations of different methods, targets or prompts cannot be joined")
            if set(ex.extras) != set(first.extras) or (ex.image_maps is None) != (first.image_maps is None):
                raise ValueError("explanations with different arrays cannot be joined")
        maps = None if first.image_maps is None else _join([ex.image_maps for ex in parts])  # type: ignore[misc]
        scores = None if first.token_scores is None else np.concatenate([ex.token_scores for ex in parts])  # type: ignore[misc]
        return cls(
            method=first.method,
            target=first.target,
            texts=first.texts,
            image_maps=maps,
            token_scores=scores,
            tokens=first.tokens,
            content=first.content,
            truncated=first.truncated,
            logits=np.concatenate([ex.logits for ex in parts]),
            probs=np.concatenate([ex.probs for ex in parts]),
            target_values=np.concatenate([ex.target_values for ex in parts]),
            geometries=[g for ex in parts for g in ex.geometries],
            images=[img for ex in parts for img in ex.images],
            extras={key: _join([ex.extras[key] for ex in parts]) for key in first.extras},
            meta=first.meta,
        )

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self, *, extras_limit: int = EXTRA_VALUES_LIMIT) -> dict:
        """Everything but the pixel arrays, as JSON-ready values (NaN and infinities as None).

        Keys: ``format``, ``method``, ``target``, ``probability`` ("softmax" | "sigmoid"),
        ``shape`` [B, P], ``texts``, ``tokens`` (per prompt), ``content`` (per prompt, bool
        per token), ``truncated``, ``meta``;
        ``images``: per image {``index``, ``width``, ``height``, ``grid`` [Gh, Gw] or None,
        ``geometry``, ``extras``: {key: {``shape``, ``dtype``, ``values`` (nested lists) or,
        above ``extras_limit`` values, ``summary`` {min, max, mean, nonfinite}}}};
        ``pairs``: per (image, prompt), image-major {``image_index``, ``prompt_index``,
        ``prompt``, ``logit``, ``probability``, ``target``, ``grid_map`` (Gh x Gw nested
        lists, None without an image map), ``map_min``, ``map_max``, ``flat`` (bool),
        ``constant`` (why the target is constant, or None), ``truncated``, ``tokens``
        ([{token, score}] of the content tokens, or None) and ``token_scores`` (every token of
        the prompt, markers included, or None)}.
        """
        B, P = self.shape
        flat = self.flat_pairs()
        images = []
        for b, geom in enumerate(self.geometries):
            images.append(
                {
                    "index": b,
                    "width": geom.width,
                    "height": geom.height,
                    "grid": None
                    if self.image_maps is None
                    else list(_per_image(self.image_maps, b).shape[-2:]),
                    "geometry": geom.to_dict(),
                    "extras": {key: _extra_dict(self.extra(key, b), extras_limit) for key in self.extras},
                }
            )
        pairs = []
        for b in range(B):
            for p in range(P):
                r = self.map_range(b, p)
                entry: dict[str, Any] = {
                    "image_index": b,
                    "prompt_index": p,
                    "prompt": self.texts[p],
                    "logit": float(self.logits[b, p]),
                    "probability": float(self.probs[b, p]),
                    "target": float(self.target_values[b, p]),
                    "grid_map": None if self.image_maps is None else _jsonable(self.grid_map(b, p)),
                    "map_min": None if r is None else r[0],
                    "map_max": None if r is None else r[1],
                    "flat": bool(flat[b, p]),
                    "constant": self.constant_reason(p),
                    "truncated": bool(self.truncated[p]),
                    "tokens": None,
                    "token_scores": None,
                }
                if self.token_scores is not None:
                    entry["tokens"] = [{"token": t, "score": _jsonable(s)} for t, s in self.token_table(b, p)]
                    entry["token_scores"] = _jsonable(self.token_scores[b, p, : len(self.tokens[p])])
                pairs.append(entry)
        return {
            "format": FORMAT_VERSION,
            "method": self.method,
            "target": self.target,
            "probability": self.probability,
            "shape": [B, P],
            "texts": list(self.texts),
            "tokens": [list(t) for t in self.tokens],
            "content": [_jsonable(self.content[p, : len(self.tokens[p])]) for p in range(P)],
            "truncated": [bool(t) for t in self.truncated],
            "meta": _json_safe(self.meta),
            "images": images,
            "pairs": pairs,
        }

    # ---- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``explanation.npz`` (arrays) and ``explanation.json`` (everything else)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "logits": self.logits,
            "probs": self.probs,
            "target_values": self.target_values,
            "content": self.content,
        }
        uniform = isinstance(self.image_maps, np.ndarray)
        if self.image_maps is not None:
            if uniform:
                arrays["image_maps"] = self.image_maps  # type: ignore[assignment]
            else:
                for b, m in enumerate(self.image_maps):
                    arrays[f"image_maps_{b}"] = np.asarray(m)
        if self.token_scores is not None:
            arrays["token_scores"] = self.token_scores
        for b, img in enumerate(self.images):
            arrays[f"image_{b}"] = img
        extra_forms = {}
        for key, value in self.extras.items():
            if isinstance(value, np.ndarray):
                extra_forms[key] = "array"
                arrays[f"extra__{key}"] = value
            else:
                extra_forms[key] = "per_image"
                for b, v in enumerate(value):
                    arrays[f"extra__{key}__{b}"] = np.asarray(v)
        info = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "target": self.target,
            "texts": self.texts,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "geometries": [g.to_dict() for g in self.geometries],
            "uniform_grid": uniform,
            "extras": extra_forms,
            "meta": _json_safe(self.meta),
        }
        tmp_npz = directory / ".explanation.npz.tmp"
        with open(tmp_npz, "wb") as f:
            np.savez_compressed(f, **arrays)
        tmp_json = directory / ".explanation.json.tmp"
        tmp_json.write_text(json.dumps(info, indent=1))
        tmp_npz.replace(directory / "explanation.npz")
        tmp_json.replace(directory / "explanation.json")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Explanation:
        """Read what :meth:`save` wrote (the folder, or either of its two files). Anything
        missing, unsupported, damaged or inconsistent raises :class:`ResultError`."""
        directory = Path(directory)
        if directory.is_file() and directory.name in ("explanation.json", "explanation.npz"):
            directory = directory.parent
        info = _read_info(directory)
        arrays = _read_arrays(directory)
        return _build(cls, directory, info, arrays)


# ---- helpers --------------------------------------------------------------------------------
def _join(values: list[PerImage]) -> PerImage:
    """Per-image arrays of several calls along B: one array when every image has the same
    shape, else a list of B arrays."""
    per_image = [np.asarray(v[b]) for v in values for b in range(len(v))]
    if all(isinstance(v, np.ndarray) for v in values) and len({a.shape for a in per_image}) == 1:
        return np.concatenate(values)  # type: ignore[arg-type]
    return per_image


def _extra_dict(a: np.ndarray, limit: int) -> dict:
    out: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.size <= limit:
        out["values"] = _jsonable(a)
        return out
    v = np.asarray(a, dtype=np.float64)
    finite = v[np.isfinite(v)]
    out["summary"] = {
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "mean": float(finite.mean()) if finite.size else None,
        "nonfinite": int(v.size - finite.size),
    }
    return out


def _json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made plain, non-finite floats as None and
    anything else that JSON cannot hold as its string."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _read_info(directory: Path) -> dict:
    path = directory / "explanation.json"
    if not directory.is_dir():
        raise ResultError(f"{directory}: no such folder (give the folder Explanation.save wrote)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultError(
            f"{directory}: no explanation.json here (not a folder Explanation.save wrote)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(info, dict):
        raise ResultError(f"{path}: not an explanation (a JSON {type(info).__name__}, not an object)")
    if info.get("format") != FORMAT_VERSION:
        raise ResultError(
            f"{path}: unsupported explanation format {info.get('format')!r} (this cliplens reads format {FORMAT_VERSION})"
        )
    return info


def _read_arrays(directory: Path) -> dict[str, np.ndarray]:
    path = directory / "explanation.npz"
    if not path.is_file():
        raise ResultError(f"{directory}: explanation.npz is missing beside explanation.json")
    damaged = (
        OSError,
        ValueError,
        EOFError,
        KeyError,
        zipfile.BadZipFile,
        zlib.error,
    )  # what np.load raises on one
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except damaged as exc:
        raise ResultError(
            f"{path}: damaged or not written by Explanation.save ({exc.__class__.__name__})"
        ) from None


def _build(cls, directory: Path, info: dict, arrays: dict[str, np.ndarray]) -> Explanation:
    where = str(directory)

    def fail(message: str) -> ResultError:
        return ResultError(f"{where}: {message}")

    def field_(key: str, kind: type) -> Any:
        if key not in info:
            raise fail(f"explanation.json has no {key!r}")
        value = info[key]
        if not isinstance(value, kind):
            raise fail(f"{key!r} in explanation.json is a {type(value).__name__}, not a {kind.__name__}")
        return value

    def array(key: str) -> np.ndarray:
        if key not in arrays:
            raise fail(f"explanation.npz has no {key!r}")
        return arrays.pop(key)

    def check(a: np.ndarray, name: str, shape: tuple, kinds: str) -> np.ndarray:
        if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
            want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
            raise fail(
                f"{name} has shape {a.shape} in explanation.npz, but explanation.json describes "
                f"{B} image(s) x {P} prompt(s): expected {want}"
            )
        if a.dtype.kind not in kinds:
            raise fail(f"{name} holds {a.dtype}, not the numbers expected")
        return a

    method, target = field_("method", str), field_("target", str)
    texts, tokens, truncated = field_("texts", list), field_("tokens", list), field_("truncated", list)
    geometries_raw, meta = field_("geometries", list), field_("meta", dict)
    if not all(isinstance(t, str) for t in texts):
        raise fail("'texts' holds something other than strings")
    if not all(isinstance(row, list) and all(isinstance(t, str) for t in row) for row in tokens):
        raise fail("'tokens' is not a list of token lists")
    if not all(isinstance(t, bool) for t in truncated):
        raise fail("'truncated' holds something other than true/false")
    B, P = len(geometries_raw), len(texts)
    if B == 0 or P == 0:
        raise fail(f"an explanation of {B} image(s) x {P} prompt(s)")
    if len(tokens) != P or len(truncated) != P:
        raise fail(f"{P} prompts but {len(tokens)} token lists and {len(truncated)} truncation flags")
    geometries = []
    for b, g in enumerate(geometries_raw):
        try:
            geometries.append(Geometry.from_dict(g))
        except (KeyError, TypeError, ValueError, IndexError):
            raise fail(f"geometry of image {b} is damaged") from None

    float_kinds = "fiu"
    logits = check(array("logits"), "logits", (B, P), float_kinds)
    probs = check(array("probs"), "probs", (B, P), float_kinds)
    values = check(array("target_values"), "target_values", (B, P), float_kinds)
    content = check(array("content"), "content", (P, None), "b")
    T = content.shape[1]
    if any(len(row) > T for row in tokens):
        raise fail(f"a prompt has more tokens than the {T} columns of 'content'")
    token_scores = arrays.pop("token_scores", None)
    if token_scores is not None:
        check(token_scores, "token_scores", (B, P, T), float_kinds)

    uniform = info.get("uniform_grid", True)
    maps: PerImage | None
    if "image_maps" in arrays:
        if not uniform:
            raise fail("explanation.json says the grids differ per image, but image_maps is one array")
        maps = check(array("image_maps"), "image_maps", (B, P, None, None), float_kinds)
    elif any(k.startswith("image_maps_") for k in arrays):
        maps = [
            check(array(f"image_maps_{b}"), f"image_maps_{b}", (P, None, None), float_kinds) for b in range(B)
        ]
    else:
        maps = None

    images = []
    for b, geom in enumerate(geometries):
        img = check(array(f"image_{b}"), f"image_{b}", (geom.height, geom.width, 3), "u")
        images.append(img)

    forms = info.get("extras")
    if forms is None:  # written before the forms were recorded: every extra is one array
        forms = {k[len("extra__") :]: "array" for k in arrays if k.startswith("extra__")}
    if not isinstance(forms, dict) or not all(v in ("array", "per_image") for v in forms.values()):
        raise fail("'extras' in explanation.json is damaged")
    extras: dict[str, PerImage] = {}
    for key, form in forms.items():
        if form == "array":
            a = array(f"extra__{key}")
            if a.ndim == 0 or a.shape[0] != B:
                raise fail(f"extra {key!r} has shape {a.shape}, expected a leading axis of {B} images")
            extras[key] = a
        else:
            extras[key] = [array(f"extra__{key}__{b}") for b in range(B)]
    if arrays:
        raise fail(
            f"explanation.npz holds arrays this explanation does not describe: {', '.join(sorted(arrays)[:3])}"
        )
    return cls(
        method=method,
        target=target,
        texts=texts,
        image_maps=maps,
        token_scores=token_scores,
        tokens=tokens,
        content=content,
        truncated=truncated,
        logits=logits,
        probs=probs,
        target_values=values,
        geometries=geometries,
        images=images,
        extras=extras,
        meta=meta,
    )
