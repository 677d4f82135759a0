"""Token x patch interactions from the two embeddings' Jacobians: the gradient reference point
for :mod:`interactions`, in the manner of exCLIP.

With ``u_I``, ``u_T`` the unit image and text embeddings, the logit is ``scale * <u_I, u_T>``
(+ bias). Per embedding dimension d, the gradient x input of ``u_I[d]`` at image token i is
``G_I[d, i] = <d u_I[d] / d x_i, x_i>`` (x_i: the token's embedding input, as in
``sensitivity``), and likewise ``G_T[d, t]`` for text token t. The interaction of token t with
patch i is the product of the two first-order expansions, contracted over the embedding:

    interactions[t, i] = scale * sum_d G_I[d, i] * G_T[d, t]

This is the plain (non-integrated) Jacobian product; exCLIP integrates the Jacobians along a
path from a baseline, which multiplies the cost below by its number of steps. Unlike
``interactions`` it is not complete: its parts do not sum to the logit.

Extras: ``interactions`` (B, P, T, Gh, Gw), NaN on padding tokens. The image map is its sum
over the real tokens, the token scores its sum over the patches.

Cost: one forward of each tower over its B (or P) distinct inputs with a graph, then D
vector-Jacobian products per tower, batched ``chunk`` at a time into one backward
(``torch.autograd.grad(..., is_grads_batched=True)``); memory ``chunk x rows x n x C`` per
batched backward. No B*P replication: the pair products are an einsum at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelAdapter, TowerRun
from ..adapters.kept import NO_BLOCK
from ..errors import InputError
from ..targets import PairLogit, Target
from .base import Attribution, Method, option, register
from .pairs import PairRuns


def gradient_x_input_per_dim(run: TowerRun, chunk: int) -> torch.Tensor:
    """(rows, D, n): for every dimension d of the unit embedding, <d u[d] / d x_j, x_j> per token j."""
    u = run.embeds / run.embeds.norm(dim=-1, keepdim=True)
    rows, D = u.shape
    x = run.input_embeds
    eye = torch.eye(D, dtype=u.dtype, device=u.device)
    parts = []
    for start in range(0, D, chunk):
        basis = eye[start : start + chunk, None, :].expand(-1, rows, D)  # (k, rows, D)
        (g,) = torch.autograd.grad(u, [x], grad_outputs=basis, is_grads_batched=True, retain_graph=True)
        parts.append((g * x.detach()).sum(-1))  # (k, rows, n)
    return torch.cat(parts).transpose(0, 1)


@register
class JacobianInteractions(Method):
    name = "jacobian_interactions"
    summary = "token x patch interactions from the product of both embeddings' Jacobians (exCLIP-style gradient reference)"
    reference = "Moeller et al. exCLIP, TMLR 2025 (integrated Jacobians; here the plain Jacobian product)"
    needs_gradient = False  # the pairs' forward is plain; the Jacobians come from one forward per distinct input

    @dataclass(frozen=True)
    class Options:
        chunk: int = option(64, "embedding dimensions per batched backward pass (memory vs speed; default 64)", "positive_int")

    def check_target(self, target: Target) -> None:
        if not isinstance(target, PairLogit):
            raise InputError(f"jacobian_interactions explains the pair logit; got target {target.describe()!r}")

    def unsupported(self, adapter: ModelAdapter, towers: tuple[str, ...], opts) -> str | None:
        if set(towers) != {"image", "text"}:
            return "method 'jacobian_interactions' pairs the two towers: explain both (towers=('image', 'text'))"
        return super().unsupported(adapter, towers, opts)

    def attention_blocks(self, tower: str, opts: Options, num_layers: int) -> frozenset[int]:
        return frozenset()  # embeddings and input gradients only: every block runs the fused kernel

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        B, P = runs.B, runs.P
        with torch.enable_grad():
            img = adapter.run_image(runs.images.pixel_values, reads=NO_BLOCK)
            g_img = gradient_x_input_per_dim(img, opts.chunk)  # (B, D, n_i)
            del img
            txt = adapter.run_text(runs.texts.input_ids, runs.texts.attention_mask, reads=NO_BLOCK)
            g_txt = gradient_x_input_per_dim(txt, opts.chunk)  # (P, D, T)
        layout = runs.image.layout
        g_img = g_img[:, :, layout.patches]  # (B, D, N)
        inter = runs.scores.scale * torch.einsum("bdn,pdt->bptn", g_img, g_txt)  # (B, P, T, N)
        pad = ~runs.text.layout.valid[None, :, :, None]
        inter = inter.masked_fill(pad, 0.0)
        gh, gw = layout.grid
        return Attribution(
            image_maps=inter.sum(2).reshape(B, P, gh, gw),
            token_scores=inter.sum(3).masked_fill(pad[..., 0], float("nan")),
            extras={"interactions": inter.masked_fill(pad, float("nan")).reshape(B, P, -1, gh, gw)},
        )

