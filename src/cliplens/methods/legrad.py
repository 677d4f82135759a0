"""LeGrad: the gradient of every layer's own readout with respect to that layer's attention.

For each explained block l of a tower, the block's output Z^l is read out as if it were the
last block (the tower's pooling, final norm and projection: ``adapter.readout``), giving an
embedding e^l. The explained scalar at layer l is the target evaluated on e^l in place of the
tower's final embedding, the other tower's final embedding held constant:

    s^l = target(e^l)           (logit target: logit_scale * <e^l / |e^l|, t / |t|>)
    Map^l[j] = mean over heads h and query rows i of (ds^l / dA^l[h, i, j])^+
    Map = sum over explained layers l of Map^l

The image map is Map at the patch columns; the text scores are Map at every token (the
display keeps the tokens between the start and end markers). Per-layer maps are in
``extras["layer_maps"]`` (B, P, L', Gh, Gw) and ``extras["text_layer_scores"]`` (B, P, L', T),
L' the explained blocks in forward order.

Paper: W. Bousselham, A. Boggust, S. Chaybouti, H. Strobelt, H. Kuehne, "LeGrad: An
Explainability Method for Vision Transformers via Feature Formation Sensitivity", 2024.

Differences from the reference (WalBouss/LeGrad, ``legrad/wrapper.py``):

- Readout. The reference reads an intermediate CLIP layer out by the MEAN over all tokens
  (class token included), then ``ln_post`` and the projection. Here the default
  (``pooling="model"``) is the tower's own readout: the class token for HF/OpenAI CLIP, the
  end-of-text token for the text tower, the pooling head for attention-pooled towers. Why: at
  the last block s^L is then exactly the similarity the model computes, and the method stays
  family-neutral. Consequence: with a readout token, s^l depends on A^l only through the
  readout token's attention row, so only that query row has a non-zero gradient and the mean
  over query rows divides it by n (a uniform scale, kept: maps are raw).
  ``pooling="mean"`` reproduces the reference readout on the image tower (towers with a
  readout token only); the text tower always uses its own readout.
- Layers. The paper sums all layers (the default here); the reference wrapper's default is
  the last 2 (``layers=2``). No min-max normalisation, no upsampling (explicit later steps);
  no SigLIP empty-prompt suppression.
- Pooled towers (no readout token, e.g. SigLIP's MAP head): as the reference, G^l is taken
  on the pooling head's attention (H x q x n) in the readout of Z^l
  (``adapter.readout_with_attention``), mean over heads and the q queries; the reference's
  SigLIP empty-prompt suppression is not applied (a separate, explicit step if wanted).
- Targets. The paper's s^l is the cosine. Here s^l is the call's target on the layer-l
  embedding, so the default logit target gives ``logit_scale`` times the paper's map (ReLU
  commutes with a positive scale); ``probability`` uses the softmax over the prompts of the
  layer-l logits, ``contrast`` the difference of the layer-l logits (other prompt's text
  embedding constant).
- Text side: the paper defines the image side; the text side here is the same rule on the
  text tower (each layer's end-of-text readout against the final image embedding). Optional:
  ``towers=("image",)`` skips it and its B*P text rows.

Cost: one forward of each explained tower over the B*P pairs (eager attention), L' extra
readouts (final norm + projection of one token), and ONE backward pass: every block receives
a detached copy of the previous block's output (same values), so the gradient of
``sum_l s^l`` reaching A^l is exactly ds^l/dA^l; that backward stops at the attention
probabilities (it never runs through the softmax or the earlier blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelAdapter, TowerRun
from ..targets import Target
from .base import Attribution, Method, last_layers, option, register
from .pairs import PairRuns, per_pair, tower_result
from .relevance import accumulation_dtype

POOLINGS = ("model", "mean")


def explained_layers(layers: int | None, num_layers: int) -> list[int]:
    """The last ``layers`` blocks (all when None or when the tower has fewer), forward order."""
    return last_layers(layers, num_layers, "layers")


def layer_readout(adapter: ModelAdapter, run: TowerRun, hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """(rows, n, C) block output -> (rows, D) embedding read out as if it left the last block:
    the tower's own readout, or (``pooling="mean"``, the reference's) the mean over the valid
    tokens through the tower's head (final norm and projection)."""
    if pooling == "model":
        return adapter.readout(run.tower, hidden, run.layout)
    valid = run.layout.valid.to(hidden.dtype)[:, :, None]
    mean = (hidden * valid).sum(1) / valid.sum(1)
    return adapter.head(run.tower, mean)


def positive_mean(grad: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(rows, H, q, n) attention gradient -> (rows, n): mean over heads and over the valid
    query rows (all q rows when ``valid`` is None) of its positive part."""
    per_row = grad.clamp(min=0).mean(dim=1)  # (rows, q, n)
    if valid is None:
        return per_row.mean(dim=1)
    w = valid.to(per_row.dtype)
    return torch.einsum("rij,ri->rj", per_row, w) / w.sum(1, keepdim=True)


@register
class LeGrad(Method):
    name = "legrad"
    summary = (
        "per-layer readout gradients w.r.t. attention, Bousselham et al. 2024 (image map and token scores)"
    )
    reference = (
        "Bousselham, Boggust, Chaybouti, Strobelt, Kuehne. LeGrad: An Explainability Method for Vision "
        "Transformers via Feature Formation Sensitivity. 2024"
    )
    detach_blocks = True

    @dataclass(frozen=True)
    class Options:
        layers: int | None = option(None, "explain the last K blocks of each tower (default: all blocks)", "positive_int")
        pooling: str = option(
            "model",
            "image readout of a layer: 'model' (the tower's own, default) or 'mean' (over all tokens, as the reference)",
            "choice",
            POOLINGS,
        )

    def requirements(self, tower: str, opts: Options) -> frozenset[str]:
        # the reference's mean readout goes through the image tower's token readout (norm + projection)
        return frozenset({"readout_token"}) if tower == "image" and opts.pooling == "mean" else frozenset()

    def graph_from(self, tower: str, opts: Options, num_layers: int) -> int:
        # each explained block's gradient comes from its own readout: earlier blocks need none
        return explained_layers(opts.layers, num_layers)[0]

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        B, P = runs.B, runs.P
        # per tower: the run and, per explained layer, where the gradient is taken and whether
        # that is a pooling head's attention
        plan: dict[str, tuple[TowerRun, list[tuple[torch.Tensor, bool]]]] = {}
        total = runs.y.new_zeros(())
        with torch.enable_grad():
            for tower in towers:
                run = runs.run(tower)
                wrt: list[tuple[torch.Tensor, bool]] = []
                plan[tower] = (run, wrt)
                for l in explained_layers(opts.layers, len(run.attentions)):
                    hidden = run.block_outputs[l]
                    if opts.pooling == "model" or tower == "text":
                        rows_e, pool = adapter.readout_with_attention(tower, hidden, run.layout)
                    else:
                        rows_e, pool = layer_readout(adapter, run, hidden, opts.pooling), None
                    wrt.append((run.attentions[l], False) if pool is None else (pool, True))
                    total = total + target(runs.context_with(tower, per_pair(rows_e, B, P))).sum()
            attns = [a for _, wrt in plan.values() for a, _ in wrt]
            grads = list(torch.autograd.grad(total, attns, allow_unused=True)) if attns else []
        out = Attribution()
        k = 0
        for tower, (run, wrt) in plan.items():
            layer_vals = []
            for a, pooled in wrt:
                g = grads[k] if grads[k] is not None else torch.zeros_like(a)
                k += 1
                # query rows: the tower's valid tokens, or all of the pooling head's queries
                g = g.detach().to(accumulation_dtype(g.dtype))
                layer_vals.append(positive_mean(g, None if pooled else run.layout.valid))
            stacked = torch.stack(layer_vals, 1)  # (rows, L', n)
            if tower == "image":
                out.image_maps = tower_result(runs, tower, stacked.sum(1))
                gh, gw = run.layout.grid
                out.extras["layer_maps"] = stacked[:, :, run.layout.patches].reshape(B, P, stacked.shape[1], gh, gw)
            else:
                out.token_scores = tower_result(runs, tower, stacked.sum(1))
                lay = stacked.masked_fill(~run.layout.valid[:, None], float("nan"))
                out.extras["text_layer_scores"] = lay.reshape(B, P, *lay.shape[1:])
        return out
