"""Grad-CAM for vision transformers, on the residual stream entering a block.

Features F are the patch tokens of the residual stream entering block ``layer`` (default:
the last block), i.e. the input of that block's first norm, as (C, Gh*Gw). With y the target:

    alpha_c = mean over patches j of dy/dF[j, c]
    cam[j]  = sum_c alpha_c F[j, c]                 map = (cam)^+

The signed cam (before the ReLU) is in ``extras["signed"]`` (B, P, Gh, Gw).

Why not the last block's output: with a class-token readout, the patch tokens leaving the
last block reach nothing (only the class token is read out), so their gradient is zero. The
stream entering the last block still reaches the class token through that block's attention.

Paper: R. R. Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017; the ViT adaptation (tokens as a feature map,
taken before the last block) as in pytorch-grad-cam's ViT recipe.

Differences from pytorch-grad-cam's ViT recipe: the features are the residual stream
entering the block (that recipe hooks the output of the block's first norm, which rescales
each token); raw map, no min-max, no upsampling; all pairs in one backward; image tower only
(the text tower has no grid).

Cost: one forward of the image tower over the B images and of the text tower over the P
prompts (no per-pair copies), then the B*P pairs' gradients at the features as one batched
vector-Jacobian product over the image graph (``shared_graph``), which runs through the blocks
from ``layer`` on only. At the last block (the default) on a tower with a readout token and the
adapter's linear pieces, through that block's readout row alone
(:func:`~cliplens.methods.pairs.readout_input_gradients`): the keys and values of every token,
the rest of one row.

Fusion models with cross-attention (BLIP image-text matching): Grad-CAM on a cross-attention
layer the way LAVIS computes it for BLIP (``compute_gradcam``): with A the cross-attention
probabilities of text layer ``layer`` (default: the middle one, LAVIS's ``block_num=6`` of 12)
and G their gradient,
    word map[t, j] = mean over heads of (A * G^+)[t, j]     (text token t, image patch j)
    map[j]         = mean over the prompt's content tokens t of word map[t, j]
The per-word maps are in ``extras["word_maps"]`` (B, P, T, Gh, Gw; NaN outside the content
tokens): which word looks at which region. Differences from LAVIS: the explained value is the
pair logit ``itm[:, 1] - itm[:, 0]`` (LAVIS: ``itm[:, 1]``; ``target`` chooses); raw values,
no upsampling, any grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelAdapter
from ..adapters.fusion import FusionAdapter
from ..targets import Target
from .base import Attribution, Method, option, register, resolve_layer
from .fusion_pairs import FusionRuns
from .pairs import PairRuns, readout_input_gradients


@register
class GradCAM(Method):
    name = "gradcam"
    summary = "Grad-CAM on the patch tokens entering the last block (image map only)"
    fusion_summary = "LAVIS's Grad-CAM on a cross-attention layer, averaged over the prompt's words (per-word maps in extras)"
    reference = "Selvaraju et al. Grad-CAM. ICCV 2017 (ViT variant: tokens as the feature map)"
    towers = ("image",)

    @dataclass(frozen=True)
    class Options:
        layer: int | None = option(
            None,
            "block whose input stream is the feature map (default: the last; negative counts from the end); "
            "fusion models: the cross-attention layer (default: the middle one, as LAVIS)",
            "int",
        )

    fusion = True
    shared_graph = True
    kept_attention = True  # the last block, for its readout row (attention_blocks)

    def graph_from(self, tower: str, opts: Options, num_layers: int) -> int:
        # the features are the stream entering this block: the backward stops there
        return resolve_layer(opts.layer, num_layers, num_layers - 1)

    def reads_readout_row(self, tower: str, opts: Options, num_layers: int) -> bool:
        # features entering the last block: their gradient through its readout row alone
        return self.graph_from(tower, opts, num_layers) == num_layers - 1

    def attention_blocks(self, tower: str, opts: Options, num_layers: int) -> frozenset[int]:
        # the features are the stream: every block runs the fused kernel; the last one keeps its
        # queries, keys and values (scale and mask) when the features enter it, for the readout row
        last = num_layers - 1
        return frozenset({last}) if resolve_layer(opts.layer, num_layers, last) == last else frozenset()

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        run = runs.image
        n_layers = len(run.block_inputs)
        layer = resolve_layer(opts.layer, n_layers, n_layers - 1)
        feats = run.block_inputs[layer]
        patches = run.layout.patches
        # the last block's input: through that block's readout row where the tower allows it
        grad = readout_input_gradients(adapter, runs, "image") if layer == n_layers - 1 else None
        if grad is None:
            (grad,) = runs.pair_gradients({"image": [feats]})["image"]  # (B, P, n, C)
        alpha = grad[:, :, patches].mean(dim=2)  # (B, P, C)
        signed = torch.einsum("bpnc,bpc->bpn", runs.pair_values("image", feats.detach())[:, :, patches], alpha)
        gh, gw = run.layout.grid
        signed = signed.reshape(runs.B, runs.P, gh, gw)
        return Attribution(image_maps=signed.clamp(min=0), extras={"signed": signed})

    def fusion_unsupported(self, adapter: FusionAdapter, opts: Options) -> str | None:
        if not adapter.cross_attention:
            return (
                f"gradcam on a fusion model is Grad-CAM on a cross-attention layer (LAVIS); "
                f"{adapter.name} ({adapter.family}) has no cross-attention"
            )
        if not adapter.text_cross_attention:
            return (
                f"gradcam on a fusion model averages the text tokens' cross-attention to the image (LAVIS); "
                f"in {adapter.name} ({adapter.family}) no text token cross-attends to the image"
            )
        return None

    def attribute_fusion(
        self, adapter: FusionAdapter, runs: FusionRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        run = runs.run
        stream, _ = run.readout
        cross = [e for e in run.events if e.kind == "cross" and e.query == stream]
        event = cross[resolve_layer(opts.layer, len(cross), lavis_layer(len(cross)))]
        (grad,) = torch.autograd.grad(runs.y.sum(), [event.probs])
        words = (event.probs.detach() * grad.clamp(min=0)).mean(dim=1)  # (rows, T, n_image)
        query, key = run.streams[event.query], run.streams[event.key]
        content = runs.content_of(query)  # (rows, n_query): tokens of the prompt's content
        count = content.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (words * content[:, :, None]).sum(dim=1) / count
        gh, gw = run.grid
        word_maps = torch.full((runs.B, runs.P, runs.text_width, gh, gw), float("nan"), dtype=words.dtype, device=words.device)
        for i in range(query.size):  # each query token's map at its position in the prompt
            maps = runs.image_maps({key.name: words[:, i]}).reshape(runs.B * runs.P, gh, gw)
            for r in torch.nonzero(content[:, i]).flatten().tolist():
                word_maps.view(-1, runs.text_width, gh, gw)[r, query.positions[r, i]] = maps[r]
        return Attribution(image_maps=runs.image_maps({key.name: mean}), extras={"word_maps": word_maps})


def lavis_layer(n_layers: int) -> int:
    """The default cross-attention layer of Grad-CAM on a fusion model: the middle one (LAVIS's
    ``block_num=6`` of BLIP-base's 12), never the last, whose content-token rows reach nothing
    (the head reads the [CLS] token only), unless there is only one."""
    return max(0, min(n_layers // 2, n_layers - 2))
