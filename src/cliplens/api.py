"""The public entry points: :func:`explain` and :func:`load_model`."""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import __version__
from .adapters import ModelAdapter, adapt, load_model
from .errors import InputError
from .explanation import Explanation
from .images import load_image
from .methods import get_method
from .targets import resolve_target

ImageLike = str | os.PathLike | Image.Image | np.ndarray


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts or [])
    if not texts:
        raise InputError("no prompts given: pass at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"prompt {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise InputError(f"prompt {i} is empty")
    return texts


def explain(
    model,
    images: ImageLike | Sequence[ImageLike],
    texts: str | Sequence[str],
    method: str = "chefer",
    *,
    target="logit",
    towers: Sequence[str] | None = None,
    resize: str = "model",
    tokenizer=None,
    max_pixels: int | None = None,
    **options,
) -> Explanation:
    """Explain the similarity of every (image, text) pair.

    Args:
        model: an adapter from :func:`load_model`, a model object (``CLIPModel``), or a spec
            string for :func:`load_model` (``"shapes"``, a directory, a hub name).
        images: one image or a list: file paths, PIL images or HxWx3 uint8 arrays.
        texts: one prompt or a list.
        method: a registered method name (``cliplens.list_methods()``).
        target: ``"logit"`` (scaled cosine, default), ``"probability"`` (softmax over the
            prompts; sigmoid for SigLIP-style models), ``"contrast:OTHER"`` (logit minus the
            logit of prompt OTHER, an index or one of the texts), or a ``Target`` object.
        towers: which towers to explain (default: every tower the method covers).
        resize: ``"model"`` (the checkpoint's resize and centre crop) or ``"full"`` (whole
            image, shortest edge to the model size, grid follows the aspect ratio).
        options: method options (see ``cliplens methods``), e.g. ``start_layer=0``.

    All pairs go through one forward pass per tower and one backward pass (per distinct
    input size when ``resize="full"`` mixes aspect ratios).
    """
    adapter: ModelAdapter = load_model(model) if isinstance(model, (str, os.PathLike)) else adapt(model, tokenizer)
    texts = check_texts(texts)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    pil_images = [load_image(img, max_pixels=max_pixels) for img in images]
    if not pil_images:
        raise InputError("no images given")
    meth = get_method(method)
    meth.check_options(options)
    if towers is None:
        towers = meth.towers
    towers = tuple(towers)
    for t in towers:
        if t not in meth.towers:
            raise InputError(f"method {meth.name!r} gives no {t} map (it covers: {', '.join(meth.towers)})")
    if resize not in ("model", "full"):
        raise InputError(f"resize must be 'model' or 'full', got {resize!r}")

    batch = adapter.tokenize(texts)
    for i, cut in enumerate(batch.truncated):
        if cut:
            warnings.warn(
                f"prompt {i} is longer than the model's text context ({adapter.context_length} tokens) "
                "and was truncated; token scores cover the kept tokens",
                stacklevel=2,
            )
    tgt = resolve_target(target, texts)
    B, P = len(pil_images), len(texts)
    maps: list[np.ndarray | None] = [None] * B
    tokens_out = np.full((B, P, batch.input_ids.shape[1]), np.nan)
    logits = np.zeros((B, P))
    probs = np.zeros((B, P))
    values = np.zeros((B, P))
    geometries = [None] * B
    extras_parts: dict[str, list[tuple[list[int], np.ndarray]]] = {}
    has_tokens = False
    for group in adapter.prepare_images(pil_images, resize=resize):
        res = meth.compute(adapter, group, batch, tgt, towers=towers, **options)
        idx = group.indices
        for j, b in enumerate(idx):
            geometries[b] = group.geometries[j]
            if res.image_maps is not None:
                maps[b] = _np(res.image_maps[j])
        if res.token_scores is not None:
            has_tokens = True
            tokens_out[idx] = _np(res.token_scores)
        logits[idx] = _np(res.logits)
        probs[idx] = _np(res.probs)
        values[idx] = _np(res.target_values)
        for key, value in res.extras.items():
            extras_parts.setdefault(key, []).append((idx, _np(value)))

    image_maps: np.ndarray | list[np.ndarray] | None
    if all(m is None for m in maps):
        image_maps = None
    elif len({m.shape for m in maps}) == 1:
        image_maps = np.stack(maps)
    else:
        image_maps = maps  # type: ignore[assignment]
    extras = {}
    for key, parts in extras_parts.items():
        if len(parts) == 1:
            extras[key] = parts[0][1]
        else:
            try:
                full = np.empty((B, *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
                for idx, arr in parts:
                    full[idx] = arr
                extras[key] = full
            except ValueError:
                pass  # per-grid extras of mixed sizes are not kept
    return Explanation(
        method=meth.name,
        target=tgt.describe(),
        texts=texts,
        image_maps=image_maps,
        token_scores=tokens_out if has_tokens else None,
        tokens=batch.tokens,
        content=_np(batch.content).astype(bool),
        truncated=batch.truncated,
        logits=logits,
        probs=probs,
        target_values=values,
        geometries=geometries,  # type: ignore[arg-type]
        images=[np.asarray(img) for img in pil_images],
        extras=extras,
        meta={
            "model": adapter.name,
            "family": adapter.family,
            "options": {k: v for k, v in options.items()},
            "towers": list(towers),
            "resize": resize,
            "cliplens": __version__,
            "torch": torch.__version__,
        },
    )


def similarity(model, images, texts, *, resize: str = "model", tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities), each (B, P), of every image against every prompt: the model's
    own zero-shot scores, with no explanation (one forward per tower, no gradients)."""
    adapter: ModelAdapter = load_model(model) if isinstance(model, (str, os.PathLike)) else adapt(model, tokenizer)
    texts = check_texts(texts)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    pil_images = [load_image(img) for img in images]
    batch = adapter.tokenize(texts)
    logits = np.zeros((len(pil_images), len(texts)))
    with adapter.explaining(), torch.no_grad():
        txt = adapter.run_text(batch.input_ids, batch.attention_mask).embeds
        txt = txt / txt.norm(dim=-1, keepdim=True)
        for group in adapter.prepare_images(pil_images, resize=resize):
            img = adapter.run_image(group.pixel_values).embeds
            img = img / img.norm(dim=-1, keepdim=True)
            lg = adapter.logit_scale() * img @ txt.T
            bias = adapter.logit_bias()
            logits[group.indices] = _np(lg if bias is None else lg + bias)
    t = torch.from_numpy(logits)
    probs = torch.sigmoid(t) if adapter.pair_probability == "sigmoid" else t.softmax(-1)
    return logits, probs.numpy()


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
