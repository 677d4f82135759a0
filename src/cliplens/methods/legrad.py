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

import torch

from ..adapters.base import ImageBatch, ModelAdapter, TextBatch, TokenLayout, TowerRun
from ..engine import PairsForward, forward_pairs, per_pair
from ..errors import InputError
from ..targets import PairContext, Target
from .base import Method, MethodResult, grid_maps, register, token_rows

POOLINGS = ("model", "mean")


def explained_layers(layers: int | None, num_layers: int) -> list[int]:
    """The last ``layers`` blocks (all when None or when the tower has fewer), forward order."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise InputError(
            f"legrad option layers must be a positive integer (the last K blocks), got {layers!r}"
        )
    return list(range(max(0, num_layers - layers), num_layers))


def layer_readout(adapter: ModelAdapter, run: TowerRun, hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """(rows, n, C) block output -> (rows, D) embedding read out as if it left the last block."""
    if pooling == "model":
        return adapter.readout(run.tower, hidden, run.layout)
    valid = run.layout.valid.to(hidden.dtype)[:, :, None]
    mean = (hidden * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
    rows = hidden.shape[0]
    one = torch.ones(rows, 1, dtype=torch.bool, device=hidden.device)
    layout = TokenLayout(
        readout=torch.zeros(rows, dtype=torch.long, device=hidden.device), content=one, valid=one
    )
    return adapter.readout(run.tower, mean, layout)


def positive_mean(grad: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(rows, H, q, n) attention gradient -> (rows, n): mean over heads and over the valid
    query rows (all q rows when ``valid`` is None) of its positive part."""
    per_row = grad.clamp(min=0).mean(dim=1)  # (rows, q, n)
    if valid is None:
        return per_row.mean(dim=1)
    w = valid.to(per_row.dtype)
    return torch.einsum("rij,ri->rj", per_row, w) / w.sum(1, keepdim=True)


def constant_pairs(fw: PairsForward, tower: str) -> torch.Tensor:
    """(B, P, D) the final embeddings of a tower for every pair, detached."""
    if tower == "image":
        e = fw.image.embeds.detach()
        return per_pair(e, fw.B, fw.P) if fw.image_per_pair else e[:, None].expand(fw.B, fw.P, -1)
    e = fw.text.embeds.detach()
    return per_pair(e, fw.B, fw.P) if fw.text_per_pair else e[None].expand(fw.B, fw.P, -1)


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
    options = {
        "layers": "explain the last K blocks of each tower (default: all blocks)",
        "pooling": "image readout of a layer: 'model' (the tower's own, default) or 'mean' (over all tokens, as the reference)",
    }

    def compute(
        self,
        adapter: ModelAdapter,
        images: ImageBatch,
        texts: TextBatch,
        target: Target,
        *,
        towers: tuple[str, ...] = ("image", "text"),
        layers: int | None = None,
        pooling: str = "model",
        **_,
    ) -> MethodResult:
        if pooling not in POOLINGS:
            raise InputError(f"legrad option pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        with adapter.explaining():
            fw = forward_pairs(
                adapter,
                images,
                texts,
                target,
                image_grad="image" in towers,
                text_grad="text" in towers,
                detach_blocks=True,
            )
            B, P = fw.B, fw.P
            img_c, txt_c = constant_pairs(fw, "image"), constant_pairs(fw, "text")
            scale, bias = adapter.logit_scale().to(img_c.dtype), adapter.logit_bias()
            plan: dict[str, tuple[TowerRun, list[tuple[torch.Tensor, bool]]]] = {}
            total = fw.y.new_zeros(())
            with torch.enable_grad():
                for tower, run in (("image", fw.image), ("text", fw.text)):
                    if tower not in towers:
                        continue
                    if tower == "image" and pooling == "mean" and not run.layout.has_readout_token:
                        raise InputError("legrad pooling='mean' needs an image tower that reads out a token")
                    chosen = explained_layers(layers, len(run.attentions))
                    wrt: list[tuple[torch.Tensor, bool]] = []  # (where the gradient is taken, pooling head?)
                    plan[tower] = (run, wrt)
                    for l in chosen:
                        hidden = run.block_outputs[l]
                        if pooling == "model" or tower == "text":
                            rows_e, pool = adapter.readout_with_attention(tower, hidden, run.layout)
                        else:
                            rows_e, pool = layer_readout(adapter, run, hidden, pooling), None
                        # the gradient is taken at the pooling head's attention for pooled towers
                        wrt.append((run.attentions[l], False) if pool is None else (pool, True))
                        e = per_pair(rows_e, B, P)
                        if tower == "image":
                            ctx = PairContext(
                                e, txt_c, e.detach()[:, 0], txt_c[0], scale, bias, adapter.pair_probability
                            )
                        else:
                            ctx = PairContext(
                                img_c, e, img_c[:, 0], e.detach()[0], scale, bias, adapter.pair_probability
                            )
                        total = total + target(ctx).sum()
                attns = [a for _, wrt in plan.values() for a, _ in wrt]
                grads = list(torch.autograd.grad(total, attns, allow_unused=True)) if attns else []
        maps: dict[str, torch.Tensor] = {}
        per_layer: dict[str, torch.Tensor] = {}
        k = 0
        for tower, (run, wrt) in plan.items():
            layer_vals = []
            for a, pooled in wrt:
                g = grads[k]
                k += 1
                if g is None:
                    g = torch.zeros_like(a)
                # query rows: the tower's valid tokens, or all of the pooling head's queries
                layer_vals.append(positive_mean(g.detach(), None if pooled else run.layout.valid))
            stacked = torch.stack(layer_vals, 1)  # (rows, L', n)
            maps[tower] = stacked.sum(1)
            per_layer[tower] = stacked
        extras = {}
        image_maps = token_scores = None
        if "image" in maps:
            run = plan["image"][0]
            image_maps = grid_maps(run, maps["image"], B, P)
            lay = per_layer["image"]
            gh, gw = run.layout.grid
            extras["layer_maps"] = lay[:, :, run.layout.patches].reshape(B, P, lay.shape[1], gh, gw)
        if "text" in maps:
            run = plan["text"][0]
            token_scores = token_rows(run, maps["text"], B, P)
            lay = per_layer["text"].masked_fill(~run.layout.valid[:, None], float("nan"))
            extras["text_layer_scores"] = lay.reshape(B, P, *lay.shape[1:])
        return MethodResult(
            image_maps=image_maps,
            token_scores=token_scores,
            logits=fw.logits,
            probs=fw.probs,
            target_values=fw.y.detach(),
            extras=extras,
        )
