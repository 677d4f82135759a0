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

Defaults are the reference's (WalBouss/LeGrad ``legrad/wrapper.py``, PyPI ``legrad-torch``
``LeWrapper(model, layer_index=-2)``, ``compute_legrad(..., apply_correction=True)``):

- Readout (``pooling="mean"``, default). A tower with a class token is read out at layer l by
  the MEAN over ALL its tokens (class token included), then the tower's head (final norm and
  projection: ``adapter.head``), as the reference's ``ln_post(feat.mean(0)) @ proj``. Towers
  that pool with an attention head (SigLIP's MAP head, CoCa's attention pooler) keep that head,
  as the reference does: G^l is taken on the head's attention (H x q x n) in the readout of Z^l
  (``adapter.readout_with_attention``), mean over heads and the q queries. ``pooling="model"``
  is the tower's own readout everywhere (the class token for HF/OpenAI CLIP): at the last block
  s^L is then exactly the model's similarity, but only the readout token's query row has a
  gradient, so the mean over query rows (the paper's difference from Chefer) divides one row
  by n. The text tower always uses its own readout (the reference has no text side).
- Layers (``layers=2``, default): the last 2 blocks, the reference wrapper's default
  (``layer_index=-2``). ``layers=None`` sums every block (what the paper's figures sweep).
- SigLIP empty-prompt correction (``correction="auto"``, default: on for image towers that pool
  with an attention head, as the reference applies it to SigLIP only; ``"on"``: every image
  tower; ``"off"``). The reference computes the same LeGrad map for the text
  ``"a photo of a"`` (its "empty" embedding: cosine with the layer-l readout, summed over the
  explained layers), min-max normalises it over the patches and sets the explained map to 0
  wherever that normalised empty map exceeds ``correction_threshold`` (0.8) -- before its own
  min-max. Here the same zeroing happens on the raw map (the min-max is a later, explicit step),
  so min-max(map) equals the reference's output. The raw empty-prompt map is in
  ``extras["empty_prompt_maps"]`` (B, P, Gh, Gw); ``layer_maps`` are left uncorrected.
- Known difference kept: on open_clip/timm SigLIP the reference pools the raw block output with
  ``attn_pool`` (no final norm before it); here the head sees what the model's own head sees
  (``post_layernorm`` first), so s^L stays the model's similarity.
- No min-max normalisation, no upsampling (explicit later steps).
- Targets. The paper's s^l is the cosine. Here s^l is the call's target on the layer-l
  embedding, so the default logit target gives ``logit_scale`` times the paper's map (ReLU
  commutes with a positive scale); ``probability`` uses the softmax over the prompts of the
  layer-l logits, ``contrast`` the difference of the layer-l logits (other prompt's text
  embedding constant). The empty-prompt map always uses the cosine, as the reference (its
  scale does not matter after min-max).
- Text side: the paper defines the image side; the text side here is the same rule on the
  text tower (each layer's end-of-text readout against the final image embedding). Optional:
  ``towers=("image",)`` skips it and its B*P text rows.

Measured: ``layers=2, pooling="mean"`` equals legrad-torch 1.1 (open_clip 2.23) to 2.5e-6
relative on the same ViT-B/16 weights (CLIP path).

Cost: one forward of each explained tower over its DISTINCT inputs (B images, P prompts;
a graph from the first explained block on), L' extra readouts (final norm + projection), and
per explained layer one batched vector-Jacobian product (``shared_graph``): the pairs'
cotangents at the layer-l readout go back through block l alone, since every block receives a
detached copy of the previous block's output (same values), so what reaches A^l is exactly
ds^l/dA^l. The explained blocks run the fused attention kernel (``kept_attention``): the
product stops at the kernel's output O, and ds^l/dA^l = dO V^T is recomputed a chunk of query
rows at a time (:class:`~cliplens.adapters.kept.KeptAttention`; float64 runs stay eager). A
mean-pooled readout gives every token's row the same cotangent, so the product crosses the
MLP's down-projection once per pair instead of once per token and pair
(:func:`mean_pooled_gradients`); a layer readout of one token (the text side,
``pooling="model"``) reads the block at that token's query row alone, and the product goes
through that row (:func:`~cliplens.methods.pairs.readout_attention_gradients`). The correction
adds one text forward of the empty prompt and one plain backward over the image rows (the empty
prompt does not depend on the call's prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..adapters.base import ModelAdapter, TowerRun
from ..adapters.kept import KeptAttention, in_graph, query_chunks
from ..targets import Target
from .base import Attribution, Method, last_layers, option, register
from .pairs import PairRuns, batched_vjp, per_pair, readout_attention_gradients, tower_result
from .relevance import accumulation_dtype, reduced_gradients

POOLINGS = ("model", "mean")
CORRECTIONS = ("auto", "on", "off")
#: the reference's "empty" prompt for the SigLIP correction (``LeWrapper._init_empty_embedding``)
EMPTY_PROMPT = "a photo of a"


def explained_layers(layers: int | None, num_layers: int) -> list[int]:
    """The last ``layers`` blocks (all when None or when the tower has fewer), forward order."""
    return last_layers(layers, num_layers, "layers")


def layer_readout(
    adapter: ModelAdapter, run: TowerRun, hidden: torch.Tensor, pooling: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(rows, n, C) block output -> ((rows, D) embedding read out as if it left the last block,
    the pooling head's probabilities or None, the (rows, C) mean it was read out of or None).
    ``pooling="mean"`` (the reference's) on an image tower with a readout token: the mean over
    the valid tokens through the tower's head (final norm and projection); otherwise the
    tower's own readout (a pooling head stays a head)."""
    if pooling == "mean" and run.tower == "image" and run.layout.has_readout_token:
        valid = run.layout.valid.to(hidden.dtype)[:, :, None]
        mean = (hidden * valid).sum(1) / valid.sum(1)
        return adapter.head(run.tower, mean), None, mean
    return (*adapter.readout_with_attention(run.tower, hidden, run.layout), None)


class Explained(NamedTuple):
    """One explained layer of a tower: where its map's gradient is taken and from what."""

    layer: int
    embeds: torch.Tensor  #: (rows, D) the layer's readout embedding e^l
    probs: object  #: the block's attention (probabilities or kept), or a pooling head's probabilities
    valid: torch.Tensor | None  #: (rows, q) the query rows the map averages over; None: all of a head's
    mean: torch.Tensor | None  #: (rows, C) the block output's mean e^l is read out of (pooling "mean")


def token_weights(run: TowerRun) -> torch.Tensor:
    """(rows, n) each token's weight in the mean over a run's valid tokens (1 / their count, 0
    for padding)."""
    valid = run.layout.valid.to(run.block_inputs[0].dtype)
    return valid / valid.sum(1, keepdim=True)


def mean_pooled_gradients(
    adapter: ModelAdapter, runs: PairRuns, tower: str, explained: Explained, cotangents: torch.Tensor
) -> torch.Tensor | None:
    """(K, rows, H, n, d) the pairs' gradients at an explained kept block's attention output
    per head (O = A V), from their ``cotangents`` (K, rows, D) at its mean-pooled readout
    embedding (:func:`layer_readout`, ``pooling="mean"``); None where this short way does not
    apply (then through the whole block): a shared run (:attr:`PairRuns.leaves`) of a tower with
    the adapter's linear pieces ("linear_split") whose block ran kept, with at least two pairs
    per distinct input (the recomputation below costs about what one pair saves).

    Every token's row of the block output gets the same cotangent, ``w_i c`` (c at the mean, w:
    :func:`token_weights`), so through the MLP's last linear map it stays one vector per pair,
    ``u = W_down^T c`` (K, rows, F), where the block's own backward runs that map over n rows
    per pair (at F = 4C, 40% of the block's product). The block's middle residual
    ``Z = X + attention_output(O)`` and ``mlp_hidden(Z)`` are recomputed from its input X and
    the kept O (once per distinct input); batched products then take u through
    ``mlp_hidden`` (token by token) to Z, where the residual adds c and each token's weight
    applies, and that on to O."""
    kept = explained.probs
    if (
        tower not in runs.leaves
        or explained.mean is None
        or not isinstance(kept, KeptAttention)
        or "linear_split" not in adapter.capabilities(tower)
        or cotangents.shape[0] < 2
    ):
        return None
    run, layer = runs.run(tower), explained.layer
    (c,) = batched_vjp(explained.embeds, [explained.mean], cotangents)  # (K, rows, C)
    with torch.enable_grad():
        heads = kept.output.detach().transpose(1, 2).requires_grad_(True)  # (rows, n, H, d)
        z = run.block_inputs[layer].detach() + adapter.attention_output(tower, layer, heads)
        middle = z.detach().requires_grad_(True)
        hidden = adapter.mlp_hidden(tower, layer, middle)  # (rows, n, F)
        # the down-projection's vector-Jacobian product, the same at any point (affine)
        probe = hidden.new_zeros(hidden.shape[0], hidden.shape[-1]).requires_grad_(True)
        (u,) = batched_vjp(adapter.mlp_down(tower, layer, probe), [probe], c)  # (K, rows, F)
        # mlp_hidden works token by token: the weight w_i of a token's cotangent can wait until
        # after it, and u enters every token as one broadcast vector (no (K, rows, n, F) copy)
        (d_middle,) = batched_vjp(hidden, [middle], u[:, :, None].expand(*u.shape[:2], *hidden.shape[1:]))
        d_middle = (d_middle + c[:, :, None]) * token_weights(run)[..., None]  # (K, rows, n, C)
        (grad,) = batched_vjp(z, [heads], d_middle)
    return grad.transpose(2, 3)  # (K, rows, H, n, d)


def corrects(run: TowerRun, correction: str) -> bool:
    """Whether the empty-prompt correction applies to this tower run."""
    if run.tower != "image" or correction == "off":
        return False
    return correction == "on" or not run.layout.has_readout_token


def empty_prompt_embedding(adapter: ModelAdapter) -> torch.Tensor:
    """(D,) the normalised text embedding of :data:`EMPTY_PROMPT` (no graph)."""
    batch = adapter.tokenize([EMPTY_PROMPT])
    with torch.no_grad():
        reads = adapter.embedding_reads("text")
        e = adapter.run_text(batch.input_ids, batch.attention_mask, reads=reads).embeds[0]
    return e / e.norm()


def suppress(values: torch.Tensor, empty: torch.Tensor, patches: torch.Tensor, threshold: float) -> torch.Tensor:
    """(rows, n) map values with the patches zeroed where the min-max over the patches of the
    empty-prompt map (rows, n) exceeds ``threshold`` (a constant empty map zeroes nothing)."""
    ev = empty[:, patches]
    lo, hi = ev.min(1, keepdim=True).values, ev.max(1, keepdim=True).values
    span = hi - lo
    mm = torch.where(span > 0, (ev - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(ev))
    out = values.clone()
    out[:, patches] = values[:, patches].masked_fill(mm > threshold, 0.0)
    return out


def unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors without repeats (by identity), in order."""
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def positive_mean(grad: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(..., H, q, n) attention gradient -> (..., n): mean over heads and over the valid query
    rows ``valid`` (..., q) (all q rows when None) of its positive part. Leading axes: rows, or
    a shared run's (B, P) pairs."""
    weights = None if valid is None else valid.to(grad.dtype)
    total = positive_row_sum(grad, weights)
    return total / (grad.shape[-2] if weights is None else weights.sum(-1, keepdim=True))


def positive_row_sum(grad: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(..., H, q, n) -> (..., n): the mean over heads of the positive part, summed over the
    query rows with ``weights`` (..., q) (all 1 when None)."""
    per_row = grad.clamp(min=0).mean(dim=-3)  # (..., q, n)
    if weights is None:
        return per_row.sum(dim=-2)
    return torch.einsum("...ij,...i->...j", per_row, weights)


def attention_positive_mean(attn, grad: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """:func:`positive_mean` of a block's attention gradient, in the accumulation dtype: ``grad``
    is that gradient, or for a :class:`~cliplens.adapters.kept.KeptAttention` the gradient at its
    output, from which dy/dA = dO V^T is recomputed a chunk of query rows at a time."""
    dtype = accumulation_dtype(grad.dtype)
    if not isinstance(attn, KeptAttention):
        return positive_mean(grad.to(dtype), valid)
    weights = None if valid is None else valid.to(dtype)
    total = 0
    for rows in query_chunks(attn, grad.shape[:-3].numel()):
        total = total + positive_row_sum(attn.grad(grad, rows, dtype), None if weights is None else weights[..., rows])
    return total / (attn.shape[-2] if weights is None else weights.sum(-1, keepdim=True))


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
    shared_graph = True
    kept_attention = True

    @dataclass(frozen=True)
    class Options:
        layers: int | None = option(
            2,
            "explain the last K blocks of each tower (default 2, the reference's; None: all blocks)",
            "positive_int",
            nullable=True,
        )
        pooling: str = option(
            "mean",
            "image readout of a layer: 'mean' (over all tokens then the head, as the reference; default; "
            "a pooling head stays a head) or 'model' (the tower's own readout)",
            "choice",
            POOLINGS,
        )
        correction: str = option(
            "auto",
            "the reference's empty-prompt correction: 'auto' (on for attention-pooled image towers, "
            "as the reference does on SigLIP; default), 'on', 'off'",
            "choice",
            CORRECTIONS,
        )
        correction_threshold: float = option(
            0.8, "zero the map where the min-max empty-prompt map exceeds this (reference: 0.8)", "positive_number"
        )

    def graph_from(self, tower: str, opts: Options, num_layers: int) -> int:
        # each explained block's gradient comes from its own readout: earlier blocks need none
        return explained_layers(opts.layers, num_layers)[0]

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        B, P = runs.B, runs.P
        # per tower: the run and its explained layers
        plan: dict[str, tuple[TowerRun, list[Explained]]] = {}
        empty_total = None  # the empty prompt's summed cosines (correction), or None
        with torch.enable_grad():
            for tower in towers:
                run = runs.run(tower)
                layers: list = []
                plan[tower] = (run, layers)
                empty_e = empty_prompt_embedding(adapter) if corrects(run, opts.correction) else None
                for l in explained_layers(opts.layers, len(run.attentions)):
                    rows_e, pool, mean = layer_readout(adapter, run, run.block_outputs[l], opts.pooling)
                    if pool is None:
                        layers.append(Explained(l, rows_e, run.attentions[l], run.layout.valid, mean))
                    else:
                        layers.append(Explained(l, rows_e, pool, None, None))
                    if empty_e is not None:
                        cos = (rows_e / rows_e.norm(dim=-1, keepdim=True)) @ empty_e.to(rows_e.dtype)
                        empty_total = cos.sum() if empty_total is None else empty_total + cos.sum()
            leaves = unique(
                [run.block_inputs[l] for run, _ in plan.values() for l in explained_layers(opts.layers, len(run.attentions))]
            )
            empty_maps = None
            if empty_total is not None:
                # no prompt in it: one plain backward over the image run's rows
                image_run, image_layers = plan["image"]
                empty_maps = layer_maps(empty_total, image_layers, leaves)
                if "image" in runs.leaves:
                    empty_maps = [runs.pair_values("image", m).reshape(B * P, -1) for m in empty_maps]
            maps = {
                tower: self._maps(adapter, runs, target, tower, layers, leaves)
                for tower, (_, layers) in plan.items()
            }
        out = Attribution()
        for tower, (run, layers) in plan.items():
            stacked = torch.stack(maps[tower], 1)  # (B*P, L', n)
            if tower == "image":
                values = stacked.sum(1)
                if empty_maps is not None:
                    empty = sum(empty_maps)
                    values = suppress(values, empty, run.layout.patches, opts.correction_threshold)
                    out.extras["empty_prompt_maps"] = tower_result(runs, tower, empty)
                out.image_maps = tower_result(runs, tower, values)
                gh, gw = run.layout.grid
                out.extras["layer_maps"] = stacked[:, :, run.layout.patches].reshape(B, P, stacked.shape[1], gh, gw)
            else:
                out.token_scores = tower_result(runs, tower, stacked.sum(1))
                valid = runs.pair_values(tower, run.layout.valid).reshape(B * P, -1)
                lay = stacked.masked_fill(~valid[:, None], float("nan"))
                out.extras["text_layer_scores"] = lay.reshape(B, P, *lay.shape[1:])
        return out

    @staticmethod
    def _maps(
        adapter: ModelAdapter, runs: PairRuns, target: Target, tower: str, layers: list[Explained], leaves: list
    ) -> list[torch.Tensor]:
        """Per explained layer, (B*P, n) the pairs' maps: the mean over heads and query rows of
        the positive part of ds^l / dA^l.

        Per-pair rows: every layer's s^l summed, one backward pass, each gradient reduced as it
        arrives. A shared run: per layer, the pairs' cotangents at the layer-l embedding (from
        per-pair copies of it) go back through that block as one batched vector-Jacobian product
        (every block's input is detached, so nothing earlier is reached); from a mean-pooled
        readout of a kept block, through :func:`mean_pooled_gradients`; from a readout token's
        row of a kept block, through that row alone
        (:func:`~cliplens.methods.pairs.readout_attention_gradients`)."""
        B, P = runs.B, runs.P
        if tower not in runs.leaves:
            total = sum(target(runs.context_with(tower, per_pair(e.embeds, B, P))).sum() for e in layers)
            return layer_maps(total, layers, leaves)
        out = []
        for e in layers:
            copies = runs.pair_values(tower, e.embeds.detach()).clone().requires_grad_(True)
            (cot,) = torch.autograd.grad(target(runs.context_with(tower, copies)).sum(), [copies])
            cot = runs.batched(tower, cot)
            rows = None if e.valid is None else runs.pair_values(tower, e.valid)
            # a readout token's layer readout: only that token's query row has a gradient
            row = None if e.mean is not None else readout_attention_gradients(adapter, runs, tower, e.layer, cot)
            if row is not None:  # (B, P, H, n): the other query rows add 0 to the mean over the valid ones
                readout = runs.pair_values(tower, runs.run(tower).layout.readout)[..., None]  # (B, P, 1)
                weight = rows.gather(-1, readout).to(row.dtype)  # 0 where the readout token is padding
                total = positive_row_sum(row.unsqueeze(-2), weight)
                out.append((total / rows.sum(-1, keepdim=True).to(total.dtype)).reshape(B * P, -1))
                continue
            grad = mean_pooled_gradients(adapter, runs, tower, e, cot)
            if grad is None:
                (grad,) = batched_vjp(e.embeds, [in_graph(e.probs)], cot)
            grad = runs.batched(tower, grad)  # (B, P, ...) at the probabilities or the kept output
            attn = runs.distinct(tower, e.probs.detach())
            out.append(attention_positive_mean(attn, grad, rows).reshape(B * P, -1))
        return out


def layer_maps(output: torch.Tensor, layers: list[Explained], leaves: list) -> list:
    """Per explained layer, (rows, n) the mean over heads and query rows (the tower's valid
    tokens, or all of a pooling head's queries) of the positive part of ``output``'s gradient at
    its attention, each reduced as it arrives in one backward pass (zeros where ``output`` does
    not reach it)."""

    def reduce(i: int, g: torch.Tensor) -> torch.Tensor:
        return attention_positive_mean(layers[i].probs.detach(), g, layers[i].valid)

    maps = reduced_gradients(output, [in_graph(e.probs) for e in layers], reduce, leaves)
    out = []
    for m, e in zip(maps, layers):
        if m is None:
            dtype = accumulation_dtype(e.probs.dtype)
            m = in_graph(e.probs).new_zeros(e.probs.shape[0], e.probs.shape[-1], dtype=dtype)
        out.append(m)
    return out
