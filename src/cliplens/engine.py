"""One forward pass of each tower over all (image, prompt) pairs, for the methods to use.

Layout: pair (b, p) is row ``b*P + p``. When a method needs gradients on a tower, that tower
runs once over the B*P rows (image b repeated for each prompt, prompt p repeated for each
image), so a single backward pass of ``y.sum()`` hands every pair its own gradient: rows of a
batch never mix in a transformer (no batch statistics). A tower that needs no gradient runs
on its B (or P) distinct inputs only, without building a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters.base import ImageBatch, ModelAdapter, TextBatch, TowerRun
from .targets import PairContext, Target


@dataclass
class PairsForward:
    B: int
    P: int
    image: TowerRun  # B*P rows if image_grad else B rows
    text: TowerRun  # B*P rows if text_grad else P rows
    y: torch.Tensor  # (B, P) the explained scalars, live
    logits: torch.Tensor  # (B, P) detached
    probs: torch.Tensor  # (B, P) detached
    image_per_pair: bool
    text_per_pair: bool

    def grad_inputs(self) -> list[torch.Tensor]:
        """The embedding inputs of the towers that run per pair (where a backward pass ends)."""
        out = []
        if self.image_per_pair:
            out.append(self.image.input_embeds)
        if self.text_per_pair:
            out.append(self.text.input_embeds)
        return out

    def backward(self) -> list[torch.Tensor]:
        """One backward pass of sum(y); returns gradients w.r.t. :meth:`grad_inputs`.
        Tensor hooks registered on captured tensors fire during it."""
        inputs = self.grad_inputs()
        if not inputs:
            return []
        return list(torch.autograd.grad(self.y.sum(), inputs))


def per_pair(x: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P, ...) -> (B, P, ...)."""
    return x.reshape(B, P, *x.shape[1:])


def forward_pairs(
    adapter: ModelAdapter,
    images: ImageBatch,
    texts: TextBatch,
    target: Target,
    *,
    image_grad: bool,
    text_grad: bool,
    detach_blocks: bool = False,
) -> PairsForward:
    """Run both towers (call inside ``adapter.explaining()``) and evaluate the target."""
    B, P = len(images), len(texts)
    pixels = images.pixel_values
    if image_grad:
        with torch.enable_grad():
            img = adapter.run_image(pixels.repeat_interleave(P, dim=0), detach_blocks=detach_blocks)
        img_all = img.embeds.detach()[::P]
        img_pairs = per_pair(img.embeds, B, P)
    else:
        with torch.no_grad():
            img = adapter.run_image(pixels, detach_blocks=detach_blocks)
        img_all = img.embeds.detach()
        img_pairs = img_all[:, None].expand(B, P, -1)
    if text_grad:
        with torch.enable_grad():
            txt = adapter.run_text(
                texts.input_ids.repeat(B, 1), texts.attention_mask.repeat(B, 1), detach_blocks=detach_blocks
            )
        txt_all = txt.embeds.detach()[:P]
        txt_pairs = per_pair(txt.embeds, B, P)
    else:
        with torch.no_grad():
            txt = adapter.run_text(texts.input_ids, texts.attention_mask, detach_blocks=detach_blocks)
        txt_all = txt.embeds.detach()
        txt_pairs = txt_all[None].expand(B, P, -1)
    scale = adapter.logit_scale().to(img_all.dtype)
    bias = adapter.logit_bias()
    ctx = PairContext(img_pairs, txt_pairs, img_all, txt_all, scale, bias, adapter.pair_probability)
    with torch.set_grad_enabled(image_grad or text_grad):
        y = target(ctx)
    with torch.no_grad():
        u_img = img_all / img_all.norm(dim=-1, keepdim=True)
        u_txt = txt_all / txt_all.norm(dim=-1, keepdim=True)
        logits = scale * u_img @ u_txt.T
        if bias is not None:
            logits = logits + bias
        probs = torch.sigmoid(logits) if adapter.pair_probability == "sigmoid" else logits.softmax(-1)
    return PairsForward(B, P, img, txt, y, logits, probs, image_grad, text_grad)
