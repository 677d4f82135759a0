"""Grad-ECLIP: the last block's attention output, opened up per token and weighted by the gradient
and by a loosened query-key affinity.

At the last block of a tower, the attention branch's output at the readout token r (class
token, end-of-text token) is o_r = sum_h sum_j A^h_{rj} V^h_j (+ bias), V^h_j head h's value of
token j mapped by its slice of W_O. Grad-ECLIP replaces the softmax weights A^h_{rj} by a
loosened affinity that lets every token contribute,

    w^h_j = min-max over j of cos(q^h_r, k^h_j)

and weights each token's value by the gradient of the explained scalar y at o_r:

    map_j = ReLU( sum_h w^h_j <dy/do_r, V^h_j> )

(the paper's per-head form: within head h, sum_c (dy/do^h)_c v^h_{j,c} is the same number as
<dy/do_r, V^h_j> with the W_O-mapped value). Because A^h_{rj} enters y only through o_r,
``dy/dA^h_{rj} = <dy/do_r, V^h_j>`` exactly: the value-gradient product is the gradient at the
last block's attention probabilities, which the capture already holds, so the method needs no
value vectors and one backward pass that stops at the last block. q and k come from the adapter
(``attention_qk``). The min-max runs over the patch tokens (image; the class token is not a
column of the map) or the real tokens (text). Text scores: the same at the end-of-text row, at
every token. ``extras["affinity"]`` holds the mean over heads of w (B, P, Gh, Gw).

Paper: C. Zhao, K. Wang, X. Zeng, R. Zhao, A. Chan, "Gradient-based Visual Explanation for
Transformer-based CLIP", ICML 2024.

Differences from the reference (Cyang-Zhao/Grad-Eclip, ``generate_emap.py``: read, no licence):

- Heads. The reference recomputes the last block as ONE head (its attention and output differ
  from the model's) and takes q, k after the output projection (with its bias); here the
  model's own heads are kept, q and k are each head's own (the paper's per-head equation), so
  the explained value is the model's.
- Scale. The reference explains the cosine and its text map divides by the sum over tokens
  1..eot-1; here the call's target (default ``logit_scale * cos``) and raw values.
- Towers that pool with an attention head (SigLIP's image tower) have no readout-token row and
  are refused (their text towers are explained).

Cost: one forward of each explained tower over its distinct inputs, the pairs' gradients at the
last block's attention as one batched vector-Jacobian product per tower (``shared_graph``),
and the last block's q and k once per distinct input (two C x C products per token). The last
block runs the fused kernel (``kept_attention``): the gradient is taken at its output O = A V,
(B, P, H, n, d) instead of the probabilities' (B, P, H, n, n), and only the readout row of
dy/dA = dO V^T is formed (float64 runs stay eager). On towers with the adapter's linear pieces
the gradient at O comes through the readout row alone (the only row of the last block the
embedding reads; :func:`~cliplens.methods.pairs.readout_attention_gradients`): one row per
input and pair instead of the block's n.
"""

from __future__ import annotations

import torch

from ..adapters.base import ModelAdapter
from ..adapters.kept import KeptAttention, in_graph
from ..targets import Target
from .base import Attribution, Method, register
from .pairs import PairRuns, readout_attention_gradients, tower_result


def min_max_over(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(rows, H, n) -> min-max over the n columns where ``keep`` (rows, n) is True, per (row,
    head); 0 elsewhere and where those columns are all equal."""
    k = keep[:, None].expand_as(x)
    big = torch.finfo(x.dtype).max
    lo = x.masked_fill(~k, big).min(-1, keepdim=True).values
    hi = x.masked_fill(~k, -big).max(-1, keepdim=True).values
    span = hi - lo
    out = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return out.masked_fill(~k | (span <= 0), 0.0)


def affinity(adapter: ModelAdapter, run, readout: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(rows, H, n): min-max over the kept tokens of cos(q^h_r, k^h_j) at the run's last block:
    the queries and keys its kept attention holds (the projections the block computed), else
    the adapter's ``attention_qk`` of the block's input."""
    attn = run.attentions[-1]
    if isinstance(attn, KeptAttention):
        q, k = attn.query, attn.key  # (rows, H, n, d)
    else:
        q, k = adapter.attention_qk(run.tower, len(run.block_inputs) - 1, run.block_inputs[-1].detach())
    rows = torch.arange(q.shape[0], device=q.device)
    qr = q[rows, :, readout]  # (rows, H, d)
    cos = torch.einsum("rhd,rhnd->rhn", qr / qr.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True))
    return min_max_over(cos, keep)


@register
class GradEclip(Method):
    name = "grad_eclip"
    summary = "gradient x value x loosened q-k affinity at the last attention, Zhao et al. ICML 2024 (image map and token scores)"
    reference = (
        "Zhao, Wang, Zeng, Zhao, Chan. Gradient-based Visual Explanation for Transformer-based CLIP. ICML 2024"
    )
    requires = frozenset({"readout_token", "linear_split"})
    shared_graph = True
    kept_attention = True  # dy/dA at the readout row only: dO_r V^T

    def graph_from(self, tower: str, opts, num_layers: int) -> int:
        # only the last block's attention output is asked a gradient: earlier blocks run once
        return num_layers - 1

    def reads_readout_row(self, tower: str, opts, num_layers: int) -> bool:
        return True  # the readout row of dy/dA, and the q-k affinity from the kept q and k

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts
    ) -> Attribution:
        B, P = runs.B, runs.P
        # the readout row of dy/dA: through that row alone where the tower allows it, else at
        # the whole block's attention (its probabilities, or a kept block's output)
        short = {t: readout_attention_gradients(adapter, runs, t) for t in towers}
        whole = [t for t in towers if short[t] is None]
        with torch.enable_grad():
            grads = runs.pair_gradients({t: [in_graph(runs.run(t).attentions[-1])] for t in whole}) if whole else {}
        out = Attribution()
        for tower in towers:
            run = runs.run(tower)
            r = run.layout.readout
            keep = run.layout.content if tower == "image" else run.layout.valid
            with torch.no_grad():
                # the affinity per row of the run (per distinct input on a shared graph), then per pair
                w = affinity(adapter, run, r, keep)
                w = runs.pair_values(tower, w).reshape(B * P, *w.shape[1:])  # (B*P, H, n)
                r = runs.pair_values(tower, r).reshape(B * P)
                if short[tower] is not None:
                    g_r = short[tower].reshape(B * P, *short[tower].shape[2:]).to(w.dtype)  # (B*P, H, n)
                else:
                    # (B, P, H, n, n) at the probabilities, or (B, P, H, n, d) at a kept block's output
                    g = grads[tower][0].detach()
                    g = g.reshape(B * P, *g.shape[2:])
                    g_r = g[torch.arange(B * P, device=g.device), :, r]  # (B*P, H, n): <dy/do_r, V^h_j>
                    attn = run.attentions[-1]
                    if isinstance(attn, KeptAttention):  # the readout row of dy/dA = dO V^T
                        v = runs.pair_values(tower, attn.value).reshape(B * P, *attn.value.shape[1:])
                        g_r = torch.einsum("rhd,rhnd->rhn", g_r, v.to(g_r.dtype))
                values = (w * g_r).sum(1).clamp(min=0)
            if tower == "image":
                out.image_maps = tower_result(runs, tower, values)
                out.extras["affinity"] = tower_result(runs, tower, w.mean(1))
            else:
                out.token_scores = tower_result(runs, tower, values)
        return out
