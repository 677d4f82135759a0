"""Gradient sensitivity of the target to the input, per patch: the seed blog's
"deoptimization", done carefully.

x is the embedding input of the image tower (``TowerRun.input_embeds``: for HF CLIP the patch
convolution plus position embeddings, class token included, before ``pre_layrnorm``), g = dy/dx
per pair. Per patch token j, ``variant``:

- ``"grad_norm"`` (default): ``|g_j|_2`` over the C channels.
- ``"grad_x_input"``: ``sum_c g_jc x_jc`` (signed; first-order change of y when the patch's
  embedding is set to zero).
- ``"pixel_grad"``: the gradient with respect to the preprocessed pixels, L2 norm over the 3
  channels and the patch's ph x pw pixels. ``extras["pixel_saliency"]`` (B, P, h, w) keeps the
  per-pixel L2 norm over channels.
- ``"iterative"``: ``steps`` normalised gradient-descent steps on the patch embeddings that
  lower y (class token and the rest of the model fixed):
  ``x <- x - step_size * rms(x0) * g / |g|_F`` with rms(x0) the root mean square norm of the
  original patch embeddings and |g|_F the norm of the patch gradient of that pair, so each step
  moves the image by the same distance whatever the gradient's scale. Map: ``|x_k,j - x_0,j|_2``
  per patch. ``extras["target_path"]`` (B, P, steps + 1) is y along the descent (it should
  fall: that is the check that the descent worked).

The text side (``grad_norm`` and ``grad_x_input`` only) applies the same rule to the token
embeddings of the text tower (token + position embedding); the other variants have no text
side and return no token scores.

What the seed blog found, and what holds here: pixel gradients of a ViT show the patch grid.
The patch embedding is a stride = kernel convolution, so dy/dpixel inside patch j is W^T g_j:
every patch shows the same fixed pattern of the convolution filters, weighted by that patch's
embedding gradient. The pixel map therefore carries the grid and filter texture, not object
boundaries; pooled per patch it is a re-weighted ``grad_norm`` (the norm of W^T g_j instead of
g_j). Read pixel maps at patch resolution.

Papers: K. Simonyan, A. Vedaldi, A. Zisserman, "Deep Inside Convolutional Networks", 2014
(gradient saliency); A. Shrikumar et al. 2016 / M. Ancona et al. 2018 (gradient x input).
There is no reference implementation for CLIP; the blog's deoptimization had no fixed step
rule and measured pixels; here the descent runs in embedding space with a normalised step.

Cost: ``grad_norm``, ``grad_x_input``, ``pixel_grad``: one forward of each tower over its
distinct inputs (B images, P prompts), then the pairs' input (or pixel) gradients as one batched
vector-Jacobian product over each tower's graph (``shared_graph``). ``iterative``: 1 + k image-tower forwards and k full
backward passes (k = ``steps``), with the text embeddings computed once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..adapters.base import ImageBatch, ModelAdapter, TowerRun
from ..adapters.kept import NO_BLOCK
from ..targets import Target
from .base import Attribution, Method, option, register
from .pairs import PairRuns, per_pair, tower_result

VARIANTS = ("grad_norm", "grad_x_input", "pixel_grad", "iterative")
TEXT_VARIANTS = ("grad_norm", "grad_x_input")


def token_values(variant: str, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(rows, n, C) gradient and input -> (rows, n) per-token values."""
    if variant == "grad_norm":
        return grad.norm(dim=-1)
    return (grad * x).sum(dim=-1)


def pixel_patch_norms(grad: torch.Tensor, run: TowerRun) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 3, h, w) pixel gradient -> per-patch L2 norm (rows, Gh, Gw) and the per-pixel
    L2 norm over channels (rows, h, w)."""
    gh, gw = run.layout.grid
    rows, ch, h, w = grad.shape
    ph, pw = h // gh, w // gw
    blocks = grad.reshape(rows, ch, gh, ph, gw, pw)
    return blocks.pow(2).sum(dim=(1, 3, 5)).sqrt(), grad.pow(2).sum(1).sqrt()


@register
class Sensitivity(Method):
    name = "sensitivity"
    summary = "input-gradient sensitivity per patch: gradient norm, gradient x input, pixel gradient, iterative descent"
    reference = "Simonyan et al. 2014 (saliency); the seed blog's deoptimization"

    @dataclass(frozen=True)
    class Options:
        variant: str = option(
            "grad_norm", "grad_norm (default), grad_x_input, pixel_grad or iterative", "choice", VARIANTS
        )
        steps: int = option(10, "iterative: number of descent steps (default 10)", "positive_int")
        step_size: float = option(
            0.05, "iterative: step length as a fraction of the patch embeddings' RMS norm (default 0.05)",
            "positive_number",
        )

    def gradient_towers(self, towers: tuple[str, ...], opts: Options) -> tuple[bool, bool]:
        return ("image" in towers, "text" in towers and opts.variant in TEXT_VARIANTS)

    shared_graph = True

    def shares_graph(self, opts: Options) -> bool:
        # iterative descends per pair: after its first step every pair has its own input
        return self.shared_graph and opts.variant != "iterative"

    def attention_blocks(self, tower: str, opts: Options, num_layers: int) -> frozenset[int]:
        return frozenset()  # gradients at the input only: every block runs the fused kernel

    def prepare_images(self, images: ImageBatch, opts: Options) -> ImageBatch:
        if opts.variant == "pixel_grad":
            # a pixel tensor that requires grad: its per-pair copy made by the pair forward is
            # then the point the gradient is asked at (the adapter keeps the embeddings in the graph)
            return dataclasses.replace(images, pixel_values=images.pixel_values.detach().requires_grad_(True))
        return images

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        variant = opts.variant
        out = Attribution()
        if runs.leaves:  # every variant but iterative, on each tower's one graph
            B, P = runs.B, runs.P
            pixels = variant == "pixel_grad"
            inputs = {t: runs.image.pixel_values if pixels else runs.run(t).input_embeds for t in runs.leaves}
            grads = runs.pair_gradients({tower: [x] for tower, x in inputs.items()})
            for tower, x in inputs.items():
                g = grads[tower][0]  # (B, P, ...)
                if pixels:
                    patch_norms, pixel = pixel_patch_norms(g.reshape(B * P, *g.shape[2:]), runs.image)
                    out.image_maps = patch_norms.reshape(B, P, *patch_norms.shape[1:])
                    out.extras["pixel_saliency"] = pixel.reshape(B, P, *pixel.shape[1:])
                    continue
                values = token_values(variant, g, runs.pair_values(tower, x.detach()))  # (B, P, n)
                result = tower_result(runs, tower, values.reshape(B * P, -1))
                if tower == "image":
                    out.image_maps = result
                else:
                    out.token_scores = result
            return out
        want_image, want_text = runs.image_per_pair, runs.text_per_pair
        if not (want_image or want_text):
            return out
        inputs: list[torch.Tensor] = []
        if want_image:
            inputs.append(runs.image.pixel_values if variant == "pixel_grad" else runs.image.input_embeds)
        if want_text:
            inputs.append(runs.text.input_embeds)
        grads = list(torch.autograd.grad(runs.y.sum(), inputs))
        B, P = runs.B, runs.P
        if want_image:
            g = grads.pop(0)
            run = runs.image
            if variant == "pixel_grad":
                patch_norms, pixel = pixel_patch_norms(g, run)
                out.image_maps = patch_norms.reshape(B, P, *patch_norms.shape[1:])
                out.extras["pixel_saliency"] = pixel.reshape(B, P, *pixel.shape[1:])
            elif variant == "iterative":
                out.image_maps, out.extras["target_path"] = self._descend(
                    adapter, runs, target, g, opts.steps, float(opts.step_size)
                )
            else:
                out.image_maps = tower_result(runs, "image", token_values(variant, g, run.input_embeds.detach()))
        if want_text:
            g = grads.pop(0)
            out.token_scores = tower_result(runs, "text", token_values(variant, g, runs.text.input_embeds.detach()))
        return out

    @staticmethod
    def _descend(
        adapter: ModelAdapter, runs: PairRuns, target: Target, grad: torch.Tensor, steps: int, step_size: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k normalised descent steps on the patch embeddings of every pair (the first gradient
        comes from the call's forward pass). Returns the per-patch change (B, P, Gh, Gw) and
        y along the way (B, P, k + 1)."""
        run = runs.image
        B, P = runs.B, runs.P
        patches = run.layout.patches
        x0 = run.input_embeds.detach()
        pixels = run.pixel_values.detach()
        mask = torch.zeros(x0.shape[1], 1, dtype=x0.dtype, device=x0.device)
        mask[patches] = 1.0
        rms = x0[:, patches].pow(2).sum(-1).mean(-1).sqrt()  # (rows,)
        x = x0
        path = [runs.y.detach()]
        for k in range(steps):
            if k > 0:
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    new = adapter.run_image(pixels, input_embeds=x_in, reads=NO_BLOCK)
                    y = target(runs.context_with("image", per_pair(new.embeds, B, P)))
                    (grad,) = torch.autograd.grad(y.sum(), [x_in])
                path.append(y.detach())
            g = grad.detach() * mask
            norm = g.flatten(1).norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
            x = x - (step_size * rms / norm)[:, None, None] * g
        with torch.no_grad():
            final = adapter.run_image(pixels, input_embeds=x, reads=adapter.embedding_reads("image"))
            path.append(target(runs.context_with("image", per_pair(final.embeds, B, P))))
        change = (x - x0).norm(dim=-1)  # (rows, n)
        return tower_result(runs, "image", change), torch.stack(path, -1)
