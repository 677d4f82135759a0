"""What scalar is explained for each (image, text) pair.

A target turns embeddings into one scalar per pair, shape (B, P). The pairs are laid out as
B*P rows (row ``b*P + p`` is image b with prompt p); each row's towers are separate copies in
the batch, so one backward pass of ``y.sum()`` gives every pair its own gradient. For targets
that involve other prompts (the softmax probability, a contrast), those prompts enter as
constants: the text-side map of pair (b, p) explains prompt p's tokens, the image side sees
the whole expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@dataclass(frozen=True)
class PairScores:
    """THE formula of a pair's score, written once: ``logit = scale * cos(image, text) (+ bias)``
    and its probability (softmax over the prompts for CLIP, each pair's sigmoid for SigLIP-style
    models). Every path that scores pairs (the explained targets, the reported logits,
    :func:`cliplens.similarity`, the evaluation's perturbation curves) goes through it, so they
    agree to the last bit on the same embeddings."""

    scale: torch.Tensor
    bias: torch.Tensor | None
    probability: str  # "softmax" or "sigmoid"

    @classmethod
    def of(cls, adapter, dtype: torch.dtype | None = None) -> "PairScores":
        scale = adapter.logit_scale()
        bias = adapter.logit_bias()
        if dtype is not None:
            scale = scale.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return cls(scale, bias, adapter.pair_probability)

    def logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Broadcast (..., D) image and text embeddings (not normalised) -> (...) pair logits."""
        y = self.scale * (_unit(img) * _unit(txt)).sum(-1)
        return y if self.bias is None else y + self.bias

    def against(self, img: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """(..., D) image embeddings against each of K text embeddings (K, D) -> (..., K)."""
        y = self.scale * torch.einsum("...d,kd->...k", _unit(img), _unit(others))
        return y if self.bias is None else y + self.bias

    def table(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """(B, D) images x (P, D) prompts -> (B, P) logits, every pair by :meth:`logits`."""
        return self.logits(img[:, None], txt[None])

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, P) logits -> (B, P) probabilities of each prompt for each image."""
        return probabilities(logits, self.probability)


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, P) pair logits -> probabilities: ``"softmax"`` over the prompts, or each pair's
    ``"sigmoid"``."""
    return torch.sigmoid(logits) if kind == "sigmoid" else logits.softmax(-1)


@dataclass(frozen=True)
class PairContext:
    """Inputs of a target. ``img``/``txt`` are (B, P, D) live per-pair embeddings;
    ``img_all`` (B, D) and ``txt_all`` (P, D) are the same embeddings, detached."""

    img: torch.Tensor
    txt: torch.Tensor
    img_all: torch.Tensor
    txt_all: torch.Tensor
    scores: PairScores

    @classmethod
    def of(cls, img: torch.Tensor, txt: torch.Tensor, scores: PairScores) -> "PairContext":
        """A context from (B, P, D) per-pair embeddings (live or not); the detached per-image
        and per-prompt embeddings are read off their first prompt / first image."""
        return cls(img, txt, img.detach()[:, 0], txt.detach()[0], scores)

    @property
    def scale(self) -> torch.Tensor:
        return self.scores.scale

    @property
    def bias(self) -> torch.Tensor | None:
        return self.scores.bias

    @property
    def probability(self) -> str:
        return self.scores.probability

    def pair_logits(self) -> torch.Tensor:
        """(B, P) logit of each pair from the live copies."""
        return self.scores.logits(self.img, self.txt)

    def logits_against_all(self) -> torch.Tensor:
        """(B, P, Q): live image copy of pair (b, p) against every prompt q, prompt q live
        only where q == p."""
        const = self.scores.against(self.img, self.txt_all)
        own = self.pair_logits()
        eye = torch.eye(self.txt_all.shape[0], dtype=torch.bool, device=own.device)
        return torch.where(eye[None], own[:, :, None], const)


@dataclass(frozen=True)
class LogitContext:
    """Inputs of a target for a fusion model (image and text scored together, no embeddings):
    ``live`` (B, P) pair logits in the graph. The targets read a fusion pair the way they read a
    dual-encoder pair: its own logit live, every other prompt's as a constant."""

    live: torch.Tensor
    probability: str

    def pair_logits(self) -> torch.Tensor:
        return self.live

    def logits_against_all(self) -> torch.Tensor:
        """(B, P, P): pair (b, p) against every prompt q, live only where q == p."""
        B, P = self.live.shape
        const = self.live.detach()[:, None, :].expand(B, P, P)
        eye = torch.eye(P, dtype=torch.bool, device=self.live.device)
        return torch.where(eye[None], self.live[:, :, None], const)


class Target:
    name = ""

    def __call__(self, ctx: PairContext) -> torch.Tensor:  # (B, P)
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class PairLogit(Target):
    """logit_scale * cos(image, text) (+ bias for sigmoid models): the similarity itself."""

    name = "logit"

    def __call__(self, ctx: PairContext) -> torch.Tensor:
        return ctx.pair_logits()


class PromptProbability(Target):
    """The probability of prompt p for image b: softmax over the given prompts for CLIP
    (``logits_per_image.softmax(-1)``), the pair's sigmoid for SigLIP-style models."""

    name = "probability"

    def __call__(self, ctx: PairContext) -> torch.Tensor:
        if ctx.probability == "sigmoid":
            return torch.sigmoid(ctx.pair_logits())
        logits = ctx.logits_against_all()  # (B, P, Q)
        p_idx = torch.arange(logits.shape[1], device=logits.device)
        return torch.softmax(logits, dim=-1)[:, p_idx, p_idx]


@dataclass(frozen=True)
class Contrast(Target):
    """logit(image, prompt p) - logit(image, prompt ``versus``): why p rather than the other.
    ``versus`` is a prompt index or the prompt text (it must be among the prompts)."""

    versus: int | str = 0
    name = "contrast"

    def index(self, texts: list[str]) -> int:
        if isinstance(self.versus, int):
            if not -len(texts) <= self.versus < len(texts):
                raise InputError(f"contrast prompt index {self.versus} is out of range for {len(texts)} prompts")
            return self.versus % len(texts)
        if self.versus not in texts:
            raise InputError(f"contrast prompt {self.versus!r} is not among the prompts")
        return texts.index(self.versus)

    def bind(self, texts: list[str]) -> "Contrast":
        return Contrast(self.index(texts))

    def __call__(self, ctx: PairContext) -> torch.Tensor:
        q = int(self.versus)
        # the other prompt enters as a constant; where p == q the contrast is zero
        return ctx.pair_logits() - ctx.logits_against_all()[:, :, q]

    def describe(self) -> str:
        return f"contrast:{self.versus}"


TARGETS = {"logit": PairLogit, "probability": PromptProbability, "prob": PromptProbability}


def _contrast_versus(rest: str, texts: list[str]) -> int | str:
    """The other prompt of ``contrast:REST``: ``#K`` is always index K; text equal to a prompt
    is that prompt (so a prompt "1" is reachable as ``contrast:1``); otherwise a whole number
    is an index (the old form) and anything else must be a prompt's text."""
    if rest.startswith("#"):
        if not rest[1:].lstrip("-").isdigit():
            raise InputError(f"contrast:#K needs a prompt index after '#', got {rest!r}")
        return int(rest[1:])
    if rest in texts:
        return rest
    if rest.lstrip("-").isdigit():
        return int(rest)
    return rest


def resolve_target(target, texts: list[str]) -> Target:
    """A Target from a Target object or a string: ``logit`` (default), ``probability``,
    ``contrast:#K`` (prompt index K), ``contrast:TEXT`` (the prompt with exactly this text) or
    ``contrast:K`` (see :func:`_contrast_versus`)."""
    if target is None:
        target = "logit"
    if isinstance(target, Contrast):
        return target.bind(texts)
    if isinstance(target, Target):
        return target
    if not isinstance(target, str):
        raise InputError(f"target must be a string or a cliplens Target, got {type(target).__name__}")
    if target.startswith("contrast"):
        _, _, rest = target.partition(":")
        if not rest:
            raise InputError("the contrast target needs the other prompt: contrast:#INDEX or contrast:TEXT")
        return Contrast(_contrast_versus(rest, texts)).bind(texts)
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose logit, probability or contrast:OTHER")
    return TARGETS[target]()
