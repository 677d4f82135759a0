"""Perturbation tests at the model input: remove patches in a map's order, re-run the model.

The curves themselves (which patches go at which step, the AUC) are
:func:`cliplens.eval.metrics.perturbation_curve`, :func:`~cliplens.eval.metrics.deletion_curve`
and :func:`~cliplens.eval.metrics.insertion_curve`; this module supplies their score
function. Patches are removed in *pixel space* on the preprocessed input, aligned with the
model's patch grid (:func:`~cliplens.eval.metrics.apply_patch_removal`, mode ``mean``,
``blur`` or ``zero``), and the score is the explained target recomputed on the perturbed
image with the same :class:`~cliplens.targets.Target` object that was explained.

:class:`CurveBatch` collects every curve of one image first (a dry run of the curve
function records the masks it asks for), removes duplicate masks (the unperturbed and the
fully removed input are shared by many curves, and the perturbed image does not depend on
the prompt), runs all perturbed inputs through the image tower in one batched forward pass
without gradients, then replays each curve with the recorded scores.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters import ModelAdapter
from ..adapters.base import TextBatch
from ..images import Geometry
from ..targets import LogitContext, PairContext, PairScores, Target
from .classifier import encode_images, encode_texts
from .metrics import PerturbationCurve, apply_patch_removal, gaussian_blur

__all__ = ["REMOVAL_MODES", "CurveBatch", "PromptScorer", "black_value", "mask_to_grid", "target_scores"]

REMOVAL_MODES = ("mean", "blur", "zero", "black")


def black_value(adapter: ModelAdapter) -> np.ndarray:
    """(3,) a black pixel (0 in [0, 1] space) in the model's normalised input space."""
    pre = adapter.preprocess
    mean, std = getattr(pre, "mean", None), getattr(pre, "std", None)
    if mean is None or std is None:
        raise ValueError(f"{type(pre).__name__} does not say its normalisation (mean, std)")
    return -np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)


def mask_to_grid(mask: np.ndarray, geometry: Geometry, grid: tuple[int, int]) -> np.ndarray:
    """The fraction of each patch of the model input covered by ``mask`` (original pixels).

    Each input pixel looks up the original pixel under its centre (nearest neighbour through
    the preprocessing geometry); input pixels outside the original (padding) count as not
    covered. Returns a (Gh, Gw) float64 map in [0, 1]: the best map a patch-level method can
    give, used as the oracle baseline.
    """
    m = np.asarray(mask, dtype=bool)
    w_in, h_in = geometry.input_size
    gh, gw = grid
    left, top = geometry.crop
    xs = np.floor((np.arange(w_in) + 0.5 + left) / geometry.scale_x).astype(np.int64)
    ys = np.floor((np.arange(h_in) + 0.5 + top) / geometry.scale_y).astype(np.int64)
    okx = (xs >= 0) & (xs < m.shape[1])
    oky = (ys >= 0) & (ys < m.shape[0])
    sampled = m[np.clip(ys, 0, m.shape[0] - 1)][:, np.clip(xs, 0, m.shape[1] - 1)]
    sampled &= oky[:, None] & okx[None, :]
    ph, pw = h_in // gh, w_in // gw
    return sampled.reshape(gh, ph, gw, pw).mean(axis=(1, 3), dtype=np.float64)


def target_scores(
    adapter: ModelAdapter, image_embeds: torch.Tensor, text_embeds: torch.Tensor, target: Target
) -> np.ndarray:
    """(S, P) values of ``target`` for S images (embeddings (S, D)) against P prompts
    (embeddings (P, D)), without gradients: the same expression :func:`cliplens.explain`
    explains, evaluated on other images."""
    S, P = image_embeds.shape[0], text_embeds.shape[0]
    dtype = image_embeds.dtype
    text_embeds = text_embeds.to(dtype)
    ctx = PairContext.of(
        image_embeds[:, None].expand(S, P, -1), text_embeds[None].expand(S, P, -1), PairScores.of(adapter, dtype)
    )
    with torch.no_grad():
        return target(ctx).detach().cpu().double().numpy()


class PromptScorer:
    """The explained target of P prompts on any preprocessed images of one size, without
    gradients: ``scorer(pixels (S, C, h, w)) -> (S, P)``. A dual encoder encodes the prompts
    once and each image once (:func:`target_scores`); a fusion model runs every (image, prompt)
    pair through the model, in chunks of ``pairs`` rows."""

    def __init__(
        self,
        adapter: ModelAdapter,
        target: Target,
        *,
        batch: TextBatch | None = None,
        text_embeds: torch.Tensor | None = None,
        pairs: int = 128,
    ):
        self.adapter, self.target, self.pairs = adapter, target, pairs
        self.batch = batch  # the prompts (fusion models)
        self.text_embeds = text_embeds  # their embeddings (dual encoders)

    @classmethod
    def of(cls, adapter: ModelAdapter, texts: list[str], target: Target) -> "PromptScorer":
        """The scorer of ``texts``: tokenised (and, for a dual encoder, encoded) once."""
        if adapter.fusion:
            return cls(adapter, target, batch=adapter.tokenize(list(texts)))
        return cls(adapter, target, text_embeds=encode_texts(adapter, texts))

    def __call__(self, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        if not self.adapter.fusion:
            return target_scores(self.adapter, encode_images(self.adapter, pixels, batch_size), self.text_embeds, self.target)
        return self.prompts(pixels, self.batch)

    def prompts(self, pixels: torch.Tensor, batch: TextBatch) -> np.ndarray:
        """(S, Q) the target on S images against the Q prompts of ``batch`` (token ids as given:
        a perturbed prompt is its ids with tokens removed). Per-pair targets only (each pair's
        logit, or its sigmoid); see :meth:`per_pair`."""
        adapter = self.adapter
        S, Q = pixels.shape[0], batch.input_ids.shape[0]
        if not adapter.fusion:
            with adapter.explaining(), torch.no_grad():
                reads = adapter.embedding_reads("text")
                txt = adapter.run_text(batch.input_ids, batch.attention_mask, reads=reads).embeds
            return target_scores(adapter, encode_images(adapter, pixels), txt, self.target)
        out = np.zeros((S, Q))
        step = max(1, self.pairs // Q)
        with adapter.explaining():
            for s0 in range(0, S, step):
                group = pixels[s0 : s0 + step]
                table = adapter.score_table(_Pixels(group), batch)
                with torch.no_grad():
                    out[s0 : s0 + len(group)] = self.target(LogitContext(table, adapter.pair_probability)).double().cpu().numpy()
        return out


class _Pixels:
    """Preprocessed pixels where an adapter expects an :class:`~cliplens.adapters.base.ImageBatch`
    (``score_table`` reads only ``pixel_values`` and the length)."""

    def __init__(self, pixel_values: torch.Tensor):
        self.pixel_values = pixel_values

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


@dataclass
class _Request:
    key: Hashable
    curve_fn: Callable[..., PerturbationCurve]
    relevance: np.ndarray
    prompt: int
    kwargs: dict
    steps: list[int]


class CurveBatch:
    """All perturbation curves of one preprocessed image, computed in one batched forward.

    ``pixels`` is the (C, h, w) model input; ``patch_size`` its (ph, pw) patch grid step.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        patch_size: tuple[int, int],
        mode: str = "mean",
        *,
        blur_sigma: float = 5.0,
        black: np.ndarray | None = None,
    ):
        if mode not in REMOVAL_MODES:
            raise ValueError(f"removal mode must be one of {', '.join(REMOVAL_MODES)}, got {mode!r}")
        self.pixels = pixels.detach()
        self.base = self.pixels.cpu().double().numpy()
        self.patch_size = tuple(patch_size)
        self.mode = mode
        self.blur_sigma = blur_sigma
        self.black = black
        self.blurred = gaussian_blur(self.base, blur_sigma) if mode == "blur" else None
        self.masks: list[np.ndarray] = []
        self._lookup: dict[bytes, int] = {}
        self.requests: list[_Request] = []

    def _index(self, mask: np.ndarray) -> int:
        m = np.ascontiguousarray(mask, dtype=bool)
        key = m.tobytes() + bytes(str(m.shape), "ascii")
        if key not in self._lookup:
            self._lookup[key] = len(self.masks)
            self.masks.append(m.copy())
        return self._lookup[key]

    def add(
        self, key: Hashable, curve_fn: Callable[..., PerturbationCurve], relevance, prompt: int, **kwargs
    ) -> None:
        """Plan ``curve_fn(relevance, score_fn, **kwargs)`` scored on prompt ``prompt``."""
        r = np.asarray(relevance, dtype=np.float64)
        steps: list[int] = []

        def record(mask: np.ndarray) -> float:
            steps.append(self._index(mask))
            return 0.0

        curve_fn(r, record, **kwargs)
        self.requests.append(_Request(key, curve_fn, r, prompt, kwargs, steps))

    def perturbed_inputs(self) -> torch.Tensor:
        """(U, C, h, w): the input with each distinct mask's patches removed."""
        out = [
            apply_patch_removal(
                self.base,
                m,
                self.patch_size,
                self.mode,
                blur_sigma=self.blur_sigma,
                blurred=self.blurred,
                black=self.black,
            )
            for m in self.masks
        ]
        return torch.from_numpy(np.stack(out)).to(device=self.pixels.device, dtype=self.pixels.dtype)

    def run(
        self,
        scorer: PromptScorer,
        *,
        batch_size: int = 512,
        score_embeds: Callable[[torch.Tensor], np.ndarray] | None = None,
    ) -> dict[Hashable, PerturbationCurve]:
        """Score every distinct perturbed input once; replay each planned curve. The score is
        the target's value per prompt (``scorer``), or ``score_embeds(image embeddings (U, D))
        -> (U, P)`` (dual encoders)."""
        if not self.requests:
            return {}
        if score_embeds is not None:
            embeds = encode_images(scorer.adapter, self.perturbed_inputs(), batch_size=batch_size)
            scores = np.asarray(score_embeds(embeds), dtype=np.float64)
        else:
            scores = scorer(self.perturbed_inputs(), batch_size=batch_size)  # (U, P)
        out: dict[Hashable, PerturbationCurve] = {}
        for req in self.requests:
            out[req.key] = req.curve_fn(req.relevance, _replay(scores, req.steps, req.prompt), **req.kwargs)
        return out


def _replay(scores: np.ndarray, steps: list[int], prompt: int) -> Callable[[np.ndarray], float]:
    """A score function that returns the recorded scores of ``steps`` in order."""
    it = iter(steps)

    def score(_mask: np.ndarray) -> float:
        return float(scores[next(it), prompt])

    return score
