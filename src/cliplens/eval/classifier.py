"""Zero-shot classifiers built the way CLIP builds them, and targets that explain them.

A class's text embedding is the mean of the L2-normalised embeddings of its prompt
templates (``"a photo of a {}."`` ...), normalised again; the classifier's logits are
``logit_scale * cos(image, class)`` and its probabilities their softmax over the K classes
(Radford et al. 2021, ``zeroshot_classifier`` in the CLIP ImageNet notebook).

Targets (cliplens :class:`~cliplens.targets.Target` subclasses, usable with
:func:`cliplens.explain`):

- :class:`ClassifierTarget` "why class c": the probability (or logit) of class ``c_p`` for
  pair (b, p);
- :class:`ClassContrastTarget` "why c rather than c'": ``logit(c_p) - logit(c'_p)``.

The prompts passed to :func:`cliplens.explain` only name the pairs (use the class names);
the class embeddings are constants, so only the image tower is explained
(``towers=("image",)``). If a text tower is asked for anyway, it is kept in the graph with
weight 0 and gets an all-zero gradient: the prompt's wording does not enter these targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapters import ModelAdapter
from ..errors import InputError
from ..targets import PairContext, Target
from .templates import IMAGENET_TEMPLATES, TEMPLATE_SETS

__all__ = ["ClassContrastTarget", "ClassifierTarget", "ZeroShotClassifier", "resolve_templates"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def resolve_templates(templates: str | Sequence[str] | None) -> tuple[str, ...]:
    """A template set name (``imagenet80``, ``plain``, ``a``, ``photo``), a list of templates
    (each with one ``{}``), or None (the 80 ImageNet templates)."""
    if templates is None:
        return IMAGENET_TEMPLATES
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        if "{}" in templates:
            templates = [templates]
        else:
            raise InputError(
                f"unknown template set {templates!r}; choose {', '.join(TEMPLATE_SETS)} or give templates with {{}}"
            )
    out = tuple(str(t) for t in templates)
    if not out:
        raise InputError("no prompt templates given")
    for t in out:
        if t.count("{}") != 1:
            raise InputError(f"a template needs exactly one {{}} for the class name, got {t!r}")
    return out


@torch.no_grad()
def encode_texts(adapter: ModelAdapter, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(N, D) projected text embeddings (not normalised), no graph."""
    out = []
    with adapter.explaining():
        for start in range(0, len(texts), batch_size):
            batch = adapter.tokenize(list(texts[start : start + batch_size]))
            reads = adapter.embedding_reads("text")
            out.append(adapter.run_text(batch.input_ids, batch.attention_mask, reads=reads).embeds.detach())
    return torch.cat(out)


@torch.no_grad()
def encode_images(adapter: ModelAdapter, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, D) projected image embeddings (not normalised) of preprocessed inputs, no graph."""
    out = []
    with adapter.explaining():
        for start in range(0, pixel_values.shape[0], batch_size):
            reads = adapter.embedding_reads("image")
            out.append(adapter.run_image(pixel_values[start : start + batch_size], reads=reads).embeds.detach())
    return torch.cat(out)


@dataclass(frozen=True)
class ZeroShotClassifier:
    """K classes, each a normalised mean of normalised template embeddings.

    ``embeddings`` (K, D) are unit vectors on the adapter's device and dtype; ``scale`` is
    the model's logit scale.
    """

    classes: tuple[str, ...]
    templates: tuple[str, ...]
    embeddings: torch.Tensor
    scale: torch.Tensor
    index: dict[str, int] = field(default_factory=dict, compare=False)

    @classmethod
    def build(
        cls,
        adapter: ModelAdapter,
        classes: Sequence[str],
        templates: str | Sequence[str] | None = None,
        *,
        batch_size: int = 256,
    ) -> ZeroShotClassifier:
        classes = tuple(str(c) for c in classes)
        if not classes:
            raise InputError("a zero-shot classifier needs at least one class")
        if len(set(classes)) != len(classes):
            raise InputError("class names must be distinct")
        temps = resolve_templates(templates)
        prompts = [t.format(c) for c in classes for t in temps]
        emb = _unit(encode_texts(adapter, prompts, batch_size).double()).reshape(len(classes), len(temps), -1)
        class_emb = _unit(emb.mean(dim=1)).to(adapter.dtype)
        return cls(
            classes, temps, class_emb, adapter.logit_scale().detach(), {c: k for k, c in enumerate(classes)}
        )

    def class_index(self, name: str) -> int:
        if name not in self.index:
            raise InputError(f"{name!r} is not one of the classifier's {len(self.classes)} classes")
        return self.index[name]

    def logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(N, K) scaled cosine logits of image embeddings (N, D) against every class."""
        e = self.embeddings.to(image_embeds.dtype)
        return self.scale.to(image_embeds.dtype) * _unit(image_embeds) @ e.T

    def probabilities(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.logits(image_embeds).softmax(dim=-1)

    def target(self, classes: Sequence[str | int], *, kind: str = "probability") -> ClassifierTarget:
        """ "Why class c" for each prompt: ``classes[p]`` is the class of pair (., p)."""
        return ClassifierTarget(self.embeddings, self._indices(classes), kind)

    def contrast(self, classes: Sequence[str | int], versus: Sequence[str | int]) -> ClassContrastTarget:
        """ "Why c rather than c'": ``logit(classes[p]) - logit(versus[p])`` for pair (., p)."""
        return ClassContrastTarget(self.embeddings, self._indices(classes), self._indices(versus))

    def _indices(self, classes: Sequence[str | int]) -> tuple[int, ...]:
        out = []
        for c in classes:
            if isinstance(c, (int, np.integer)):
                if not 0 <= int(c) < len(self.classes):
                    raise InputError(f"class index {c} is out of range for {len(self.classes)} classes")
                out.append(int(c))
            else:
                out.append(self.class_index(c))
        return tuple(out)


def _keep_text(ctx: PairContext, y: torch.Tensor) -> torch.Tensor:
    """Keep a live text tower in the graph with weight 0 (its gradient is then exactly 0)."""
    if ctx.txt.requires_grad:
        y = y + 0.0 * ctx.txt.sum(-1)
    return y


def _class_logits(ctx: PairContext, embeddings: torch.Tensor) -> torch.Tensor:
    """(B, P, K) scaled cosine of each pair's live image copy against every class."""
    e = embeddings.to(device=ctx.img.device, dtype=ctx.img.dtype)
    return ctx.scale * torch.einsum("bpd,kd->bpk", _unit(ctx.img), e)


class ClassifierTarget(Target):
    """Pair (b, p) explains class ``indices[p]`` of a zero-shot classifier: its softmax
    probability over the K classes (``kind="probability"``) or its logit (``kind="logit"``).
    The class embeddings are constants."""

    name = "class"

    def __init__(self, class_embeddings: torch.Tensor, indices: Sequence[int], kind: str = "probability"):
        if kind not in ("probability", "logit"):
            raise InputError(f"classifier target kind must be 'probability' or 'logit', got {kind!r}")
        self.class_embeddings = class_embeddings
        self.indices = tuple(int(i) for i in indices)
        self.kind = kind

    def __call__(self, ctx: PairContext) -> torch.Tensor:
        P = ctx.img.shape[1]
        if P != len(self.indices):
            raise InputError(f"the classifier target names {len(self.indices)} classes for {P} prompts")
        logits = _class_logits(ctx, self.class_embeddings)
        values = logits.softmax(dim=-1) if self.kind == "probability" else logits
        idx = torch.tensor(self.indices, device=values.device)
        y = values.gather(2, idx.view(1, P, 1).expand(values.shape[0], P, 1)).squeeze(2)
        return _keep_text(ctx, y)

    def describe(self) -> str:
        return f"class-{self.kind}"


class ClassContrastTarget(Target):
    """Pair (b, p): ``logit(indices[p]) - logit(versus[p])`` of a zero-shot classifier,
    "why this class rather than that one" (equal to the log-ratio of their probabilities)."""

    name = "class-contrast"

    def __init__(self, class_embeddings: torch.Tensor, indices: Sequence[int], versus: Sequence[int]):
        if len(indices) != len(versus):
            raise InputError("the contrast needs one other class per class")
        self.class_embeddings = class_embeddings
        self.indices = tuple(int(i) for i in indices)
        self.versus = tuple(int(i) for i in versus)

    def __call__(self, ctx: PairContext) -> torch.Tensor:
        P = ctx.img.shape[1]
        if P != len(self.indices):
            raise InputError(f"the contrast target names {len(self.indices)} classes for {P} prompts")
        logits = _class_logits(ctx, self.class_embeddings)
        B = logits.shape[0]
        a = torch.tensor(self.indices, device=logits.device).view(1, P, 1).expand(B, P, 1)
        b = torch.tensor(self.versus, device=logits.device).view(1, P, 1).expand(B, P, 1)
        y = (logits.gather(2, a) - logits.gather(2, b)).squeeze(2)
        return _keep_text(ctx, y)
