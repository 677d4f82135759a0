"""The result of :func:`cliplens.explain`: raw maps and scores with everything needed to read them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import Geometry

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Explanation:
    """Explanations of B images x P prompts by one method.

    Attributes (letters: B images, P prompts, T tokens, Gh x Gw patch grid):
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
        extras: method-specific arrays (for example per-layer maps).
        meta: model name, options, versions.
    """

    method: str
    target: str
    texts: list[str]
    image_maps: np.ndarray | list[np.ndarray] | None
    token_scores: np.ndarray | None
    tokens: list[list[str]]
    content: np.ndarray
    truncated: list[bool]
    logits: np.ndarray
    probs: np.ndarray
    target_values: np.ndarray
    geometries: list[Geometry]
    images: list[np.ndarray]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
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

    def overlay(self, b: int, p: int, **kwargs) -> Image.Image:
        """The original image b with prompt p's map over it (see :func:`cliplens.viz.overlay`)."""
        from .viz import overlay

        return overlay(self.images[b], self.map_on_original(b, p), **kwargs)

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
                arrays["image_maps"] = self.image_maps
            else:
                for b, m in enumerate(self.image_maps):
                    arrays[f"image_maps_{b}"] = m
        if self.token_scores is not None:
            arrays["token_scores"] = self.token_scores
        for b, img in enumerate(self.images):
            arrays[f"image_{b}"] = img
        for key, value in self.extras.items():
            arrays[f"extra__{key}"] = value
        info = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "target": self.target,
            "texts": self.texts,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "geometries": [g.to_dict() for g in self.geometries],
            "uniform_grid": uniform,
            "meta": self.meta,
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
    def load(cls, directory: str | Path) -> "Explanation":
        directory = Path(directory)
        info = json.loads((directory / "explanation.json").read_text())
        if info.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported explanation format {info.get('format')!r}")
        with np.load(directory / "explanation.npz") as z:
            arrays = {k: z[k] for k in z.files}
        B = len(info["geometries"])
        if "image_maps" in arrays:
            maps: np.ndarray | list[np.ndarray] | None = arrays["image_maps"]
        elif "image_maps_0" in arrays:
            maps = [arrays[f"image_maps_{b}"] for b in range(B)]
        else:
            maps = None
        return cls(
            method=info["method"],
            target=info["target"],
            texts=info["texts"],
            image_maps=maps,
            token_scores=arrays.get("token_scores"),
            tokens=info["tokens"],
            content=arrays["content"],
            truncated=info["truncated"],
            logits=arrays["logits"],
            probs=arrays["probs"],
            target_values=arrays["target_values"],
            geometries=[Geometry.from_dict(g) for g in info["geometries"]],
            images=[arrays[f"image_{b}"] for b in range(B)],
            extras={k[len("extra__") :]: v for k, v in arrays.items() if k.startswith("extra__")},
            meta=info["meta"],
        )
