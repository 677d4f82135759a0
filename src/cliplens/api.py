"""The public entry points: :func:`explain` and :func:`similarity`, and the request object they
validate once."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import __version__
from .adapters import ModelAdapter, adapt, load_model
from .errors import InputError
from .explanation import Explanation
from .images import load_image
from .methods import Method, get_method
from .preprocess import check_resize
from .regions import RegionImage, check_image_inputs, region_extras
from .targets import PairLogit, Target, probabilities, resolve_target

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


#: pairs explained together in one forward/backward unless ``max_pairs`` says otherwise: the
#: memory of a call is bounded by this many pairs, whatever the numbers of images and prompts
DEFAULT_MAX_PAIRS = 128


@dataclass(frozen=True)
class ExplainRequest:
    """Everything an explain call asks, except the model and the images, validated once and
    before any model loads. :func:`explain`, the CLI and a web front end build one with
    :meth:`build`; a bad value is a one-line :class:`~cliplens.errors.InputError`."""

    texts: list[str]
    method: Method
    target: Target
    towers: tuple[str, ...]
    resize: str
    options: dict
    max_pairs: int = DEFAULT_MAX_PAIRS

    @classmethod
    def build(
        cls,
        texts: str | Sequence[str],
        method: str = "chefer",
        *,
        target="logit",
        towers: str | Sequence[str] | None = None,
        resize: str = "model",
        options: dict | None = None,
        max_pairs: int | None = None,
    ) -> "ExplainRequest":
        texts = check_texts(texts)
        meth = get_method(method)
        options = dict(options or {})
        meth.check_options(options)
        if towers is None:
            towers = meth.towers
        if isinstance(towers, str):  # towers="image" means the image tower, not its letters
            towers = (towers,)
        towers = tuple(towers)
        for t in towers:
            if t not in meth.towers:
                raise InputError(f"method {meth.name!r} gives no {t} map (it covers: {', '.join(meth.towers)})")
        if not towers:
            raise InputError("no towers to explain")
        if max_pairs is None:
            max_pairs = DEFAULT_MAX_PAIRS
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
            raise InputError(f"max_pairs must be a positive integer (pairs explained at once), got {max_pairs!r}")
        return cls(texts, meth, resolve_target(target, texts), towers, check_resize(resize), options, max_pairs)


def _adapter(model, tokenizer) -> ModelAdapter:
    return load_model(model) if isinstance(model, (str, os.PathLike)) else adapt(model, tokenizer)


def _load_images(images, max_pixels: int | None) -> list[Image.Image]:
    if images is None:
        raise InputError("no images given (images is None)")
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray, torch.Tensor, RegionImage)):
        images = [images]
    try:
        images = list(images)
    except TypeError:
        raise InputError(
            f"images must be an image or a list of them (paths, PIL images, HxWx3 uint8 arrays), "
            f"got a {type(images).__name__}"
        ) from None
    # region features (LXMERT) pass through as they are: the adapter reads them
    pil_images = [
        img if isinstance(img, RegionImage) else load_image(img, max_pixels=max_pixels) for img in images
    ]
    if not pil_images:
        raise InputError("no images given")
    return pil_images


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
    max_pairs: int | None = None,
    **options,
) -> Explanation:
    """Explain the similarity of every (image, text) pair.

    Args:
        model: an adapter from :func:`load_model`, a model object (``CLIPModel``), or a spec
            string for :func:`load_model` (``"shapes"``, a directory, a hub name).
        images: one image or a list: file paths, PIL images or HxWx3 uint8 arrays; for a
            region-feature model (LXMERT), :class:`~cliplens.RegionImage` objects instead.
        texts: one prompt or a list.
        method: a registered method name (``cliplens.list_methods()``).
        target: ``"logit"`` (scaled cosine, default; a fusion model's match log-odds),
            ``"probability"`` (softmax over the prompts; sigmoid for SigLIP-style and fusion models), ``"contrast:OTHER"`` (logit minus the
            logit of prompt OTHER, an index or one of the texts), or a ``Target`` object.
        towers: which towers to explain (default: every tower the method covers).
        resize: ``"model"`` (the checkpoint's resize and centre crop) or ``"full"`` (whole
            image, shortest edge to the model size, grid follows the aspect ratio).
        max_pairs: at most this many (image, prompt) pairs go through one forward and backward
            (default :data:`DEFAULT_MAX_PAIRS`); more are explained in chunks, with the same
            numbers, so memory is bounded by the chunk and not by the call.
        options: method options (see ``cliplens methods``), e.g. ``start_layer=0``.

    The pairs of a chunk go through one forward pass per tower and one backward pass (per
    distinct input size when ``resize="full"`` mixes aspect ratios).
    """
    request = ExplainRequest.build(
        texts, method, target=target, towers=towers, resize=resize, options=options, max_pairs=max_pairs
    )
    adapter = _adapter(model, tokenizer)
    return explain_request(adapter, _load_images(images, max_pixels), request)


def explain_request(adapter: ModelAdapter, pil_images: list[Image.Image], request: ExplainRequest) -> Explanation:
    """Run a validated request on loaded images (see :func:`explain`)."""
    meth, texts, towers = request.method, request.texts, request.towers
    check_image_inputs(adapter, pil_images)
    batch = adapter.tokenize(texts)
    for i, cut in enumerate(batch.truncated):
        if cut:
            warnings.warn(
                f"prompt {i} is longer than the model's text context ({adapter.context_length} tokens) "
                "and was truncated; token scores cover the kept tokens",
                stacklevel=3,
            )
    B, P = len(pil_images), len(texts)
    per_image: dict[str, list] = {"image_maps": [None] * B}
    tokens_out = np.full((B, P, batch.input_ids.shape[1]), np.nan)
    logits, values = np.zeros((B, P)), np.zeros((B, P))
    geometries = [None] * B
    has_tokens = False
    groups = adapter.prepare_images(pil_images, resize=request.resize)
    chunks = [c for g in groups for c in pair_chunks(g, batch, request)]
    bar = _progress(len(chunks))
    for group, prompts in chunks:
        text_chunk = batch.rows(prompts)
        res = meth.compute(adapter, group, text_chunk, request.target, towers=towers, **request.options)
        idx = group.indices
        cells = np.ix_(idx, range(prompts.start, prompts.stop))
        for j, b in enumerate(idx):
            geometries[b] = group.geometries[j]
        named = {"image_maps": res.image_maps, **{f"extra__{k}": v for k, v in res.extras.items()}}
        for key, value in named.items():
            if value is None:
                continue
            rows = _np(value)
            slots = per_image.setdefault(key, [None] * B)
            for j, b in enumerate(idx):
                if key[len("extra__") :] in meth.image_only_extras:  # no prompt axis
                    slots[b] = rows[j]
                    continue
                if slots[b] is None:
                    slots[b] = np.full((P, *rows.shape[2:]), np.nan, dtype=rows.dtype)
                slots[b][prompts] = rows[j]
        if res.token_scores is not None:
            has_tokens = True
            tokens_out[cells] = _np(res.token_scores)
        logits[cells] = _np(res.logits)
        values[cells] = _np(res.target_values)
        bar.update(1)
    bar.close()
    # probabilities over every prompt of the call, from the pairs' logits (chunks see only some)
    probs = probabilities(torch.from_numpy(logits), adapter.pair_probability).numpy()
    image_maps = _stack_or_list(per_image.pop("image_maps"))
    # extras follow the maps: one array when every image has the same grid, else one per image
    extras = {key[len("extra__") :]: _stack_or_list(v) for key, v in per_image.items()}
    extras.update(region_extras(pil_images, image_maps))  # region images: the maps painted on them
    return Explanation(
        method=meth.name,
        target=request.target.describe(),
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
            "probability": adapter.pair_probability,
            "options": dict(request.options),
            "towers": list(towers),
            "resize": request.resize,
            "cliplens": __version__,
            "torch": torch.__version__,
        },
    )


def pair_chunks(group, batch, request: ExplainRequest):
    """Split one image group x all prompts into chunks of at most ``request.max_pairs`` pairs:
    [(image sub-batch, prompt slice)]. Prompts are split only where each pair's target is its
    own (the logit); a target that reads other prompts (probability, contrast) keeps them all
    together and the images are split instead. Every chunk gives exactly the numbers its pairs
    get in one batch (rows of a batch never mix)."""
    B, P = len(group), len(batch)
    limit = request.max_pairs
    split_prompts = isinstance(request.target, PairLogit) and P > limit
    p_step = min(P, limit) if split_prompts else P
    b_step = max(1, limit // p_step)
    out = []
    for b0 in range(0, B, b_step):
        sub = group if b_step >= B else group.rows(slice(b0, b0 + b_step))
        for p0 in range(0, P, p_step):
            out.append((sub, slice(p0, min(P, p0 + p_step))))
    return out


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="explaining pairs", unit="chunk", disable=total < 2 or None)


def _stack_or_list(rows: list[np.ndarray | None]) -> np.ndarray | list[np.ndarray] | None:
    """Per-image arrays -> one (B, ...) array when their shapes agree, else the list itself."""
    if all(r is None for r in rows):
        return None
    if len({r.shape for r in rows}) == 1:
        return np.stack(rows)
    return rows  # type: ignore[return-value]


def similarity(model, images, texts, *, resize: str = "model", tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities), each (B, P), of every image against every prompt: the model's
    own zero-shot scores, with no explanation (one forward per tower, no gradients)."""
    texts = check_texts(texts)
    check_resize(resize)
    adapter = _adapter(model, tokenizer)
    pil_images = _load_images(images, None)
    check_image_inputs(adapter, pil_images)
    batch = adapter.tokenize(texts)
    logits = np.zeros((len(pil_images), len(texts)))
    with adapter.explaining():
        for group in adapter.prepare_images(pil_images, resize=resize):
            logits[group.indices] = _np(adapter.score_table(group, batch))
    probs = probabilities(torch.from_numpy(logits), adapter.pair_probability)
    return logits, probs.numpy()


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
