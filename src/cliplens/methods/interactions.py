"""Token x patch interactions, exact: which word of a prompt matches which image region.

With both towers' final norms frozen at their observed statistics (as :mod:`decomposition`
does), each embedding is an exact sum of per-token terms plus a constant:

    e_I = sum_i c_i + c_0        e_T = sum_t d_t + d_0

- ``c_i`` (image token i, in embedding space D): everything the readout token's residual stream
  receives DIRECTLY from position i, summed over blocks and heads: ``sum_{l,h} A^{l,h}_{r,i}
  V^{l,h}_i`` (V: head h's value of the stream at position i entering block l, mapped by its slice
  of the output projection), sent through the frozen final norm and projection, plus its share
  of the readout's constant. "Patch i" therefore means the residual stream at patch position i as
  the readout token reads it in each block, which after block 0 already mixes in other positions
  through their own attention: a direct-path attribution, as in TextSpan.
- ``c_0``: the rest (the readout token's own stream entering block 0, the attention output
  biases, the MLP terms at the readout token, and the columns of non-patch tokens such as the
  class token), with their constant shares.
- ``d_t``, ``d_0``: the same on the text tower (t runs over every real token, start and end
  markers included).

The pair logit is bilinear in these parts:

    logit = k * (sum_{t,i} <c_i, d_t> + sum_t <c_0, d_t> + sum_i <c_i, d_0> + <c_0, d_0>) + bias
    k = logit_scale / (|e_I| |e_T|)

so ``interactions[t, i] = k <c_i, d_t>`` is an exact (T x N) matrix per pair; the rows and
columns of the constants complete it (``extras``), and the completeness error is returned. Its
marginals are first-order maps: summed over tokens (with the text constant) it is the
decomposition's image map; summed over patches (with the image constant) its token scores.

Extras (letters: B images, P prompts, T tokens, Gh x Gw grid):

- ``interactions`` (B, P, T, Gh, Gw): k <c_i, d_t>, NaN on padding tokens;
- ``interactions_image_const`` (B, P, T): k <c_0, d_t>; ``interactions_text_const``
  (B, P, Gh, Gw): k <c_i, d_0>; ``interactions_const`` (B, P): k <c_0, d_0>;
- ``delta_similarity`` (B, P): |sum of every part + bias - logit| / |logit|.

``Explanation.word_map(b, p, word)`` sums the rows of a word's tokens.

Target: the pair logit only (a probability is not bilinear in the parts); towers: both (an
interaction needs both). Families: those whose towers both read out a token through linear
pieces (CLIP, open_clip with standard blocks); SigLIP's image tower pools through an attention
head and an MLP and is refused.

References: the decomposition of Gandelsman, Efros, Steinhardt (ICLR 2024); the interaction
question and the multi-object pointing game of exCLIP (Moeller et al., TMLR 2025) and FIxLIP
(NeurIPS 2025), which answer it with integrated Jacobians (about D backward passes per tower)
and Banzhaf interactions (many model evaluations). This method is exact for the frozen-norm
linearisation and needs one forward per tower and no gradient.

Cost: one forward of each tower over the B images and P prompts (no B*P replication), the
value heads of every block (as ``decomposition``), then a (B, N, D) x (P, T, D) product:
B*P*T*N*D multiply-adds and B*P*T*N numbers kept.
"""

from __future__ import annotations

import torch

from ..adapters.base import ModelAdapter
from ..adapters.kept import query_rows
from ..errors import InputError
from ..targets import PairLogit, Target
from .base import Attribution, Method, register
from .decomposition import FrozenReadout
from .pairs import PairRuns


def token_parts(adapter: ModelAdapter, readout: FrozenReadout) -> tuple[torch.Tensor, torch.Tensor]:
    """A tower's embedding as per-token terms (rows, n, D) and a constant (rows, D), exactly
    (to rounding) summing to the embedding with the final norm frozen."""
    run, tower = readout.run, readout.tower
    ar, r = readout.ar, readout.r
    x0 = run.block_inputs[0][ar, r]
    tok = torch.zeros(*run.block_inputs[0].shape, dtype=x0.dtype, device=x0.device)  # (rows, n, C)
    rest = x0
    for l, (x, attn) in enumerate(zip(run.block_inputs, run.attentions)):
        V = adapter.attention_value_heads(tower, l, x)  # (rows, H, n, C)
        a = query_rows(attn, r)  # (rows, H, n): the readout token's attention rows
        direct = torch.einsum("rhn,rhnc->rnc", a, V)
        tok = tok + direct
        attn_out = direct.sum(1)
        b_o = adapter.attention_out_bias(tower, l)
        if b_o is not None:
            attn_out = attn_out + b_o
            rest = rest + b_o
        mlp = adapter.mlp_output(tower, l, (x[ar, r] + attn_out)[:, None])[:, 0]
        rest = rest + mlp
    L, H = len(run.attentions), run.attentions[0].shape[1]
    valid = run.layout.valid.to(x0.dtype)
    # every real token carries L*H shares of the readout's constant (one per block and head)
    tok_d = readout.to_embedding(tok, 0.0) + (L * H) * valid[:, :, None] * readout.const_d_share[:, None]
    rest_d = readout.to_embedding(rest, readout.K - L * H * readout.n_valid)
    return tok_d, rest_d


@register
class Interactions(Method):
    name = "interactions"
    summary = "exact token x patch interaction matrix of the logit, from the frozen-norm decomposition (no gradient)"
    reference = (
        "Gandelsman, Efros, Steinhardt. ICLR 2024 (decomposition); interaction maps as asked by "
        "exCLIP (Moeller et al., TMLR 2025) and FIxLIP (NeurIPS 2025)"
    )
    needs_gradient = False
    kept_attention = True  # the readout token's attention rows alone (``query_rows``)
    requires = frozenset({"readout_token", "linear_split"})
    complete = True

    def check_target(self, target: Target) -> None:
        if not isinstance(target, PairLogit):
            raise InputError(
                f"interactions split the pair logit exactly; the target {target.describe()!r} is not "
                "bilinear in the two embeddings (use target='logit')"
            )

    def unsupported(self, adapter: ModelAdapter, towers: tuple[str, ...], opts) -> str | None:
        if set(towers) != {"image", "text"}:
            return "method 'interactions' pairs the two towers: explain both (towers=('image', 'text'))"
        return super().unsupported(adapter, towers, opts)

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts
    ) -> Attribution:
        B, P = runs.B, runs.P
        img, txt = runs.image, runs.text
        with torch.no_grad():
            c, c0 = token_parts(adapter, FrozenReadout(adapter, img))  # (B, n_i, D), (B, D)
            d, d0 = token_parts(adapter, FrozenReadout(adapter, txt))  # (P, T, D), (P, D)
            patches = img.layout.patches
            other = torch.ones(c.shape[1], dtype=torch.bool, device=c.device)
            other[patches] = False
            c0 = c0 + c[:, other].sum(1)  # non-patch image tokens (the class token) join the constant
            c = c[:, patches]  # (B, N, D)
            k = runs.scores.scale / (img.embeds.norm(dim=-1)[:, None] * txt.embeds.norm(dim=-1)[None])  # (B, P)
            inter = k[..., None, None] * torch.einsum("bnd,ptd->bptn", c, d)  # (B, P, T, N)
            image_const = k[..., None] * torch.einsum("bd,ptd->bpt", c0, d)  # (B, P, T)
            text_const = k[..., None] * torch.einsum("bnd,pd->bpn", c, d0)  # (B, P, N)
            const = k * (c0 @ d0.T)  # (B, P)
            bias = 0.0 if runs.scores.bias is None else runs.scores.bias
            total = inter.sum((2, 3)) + image_const.sum(2) + text_const.sum(2) + const + bias
            y = runs.y
            delta = (total - y).abs() / y.abs().clamp_min(torch.finfo(y.dtype).tiny)
            pad = ~txt.layout.valid[None, :, :]  # (1, P, T)
            gh, gw = img.layout.grid
            image_maps = (inter.sum(2) + text_const).reshape(B, P, gh, gw)
            token_scores = (inter.sum(3) + image_const).masked_fill(pad, float("nan"))
            extras = {
                "interactions": inter.masked_fill(pad[..., None], float("nan")).reshape(B, P, -1, gh, gw),
                "interactions_image_const": image_const.masked_fill(pad, float("nan")),
                "interactions_text_const": text_const.reshape(B, P, gh, gw),
                "interactions_const": const,
                "delta_similarity": delta,
            }
        return Attribution(image_maps=image_maps, token_scores=token_scores, extras=extras)
