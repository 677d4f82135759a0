"""chefer and legrad against the plain forward+backward and against the reference loops, on a
ViT-B/16-sized random CLIP, one image, P prompts: time and peak memory ratios in one run.

- plain pass: the image repeated P times and the P texts through the model's default
  attention path, the P pair logits summed and back-propagated to the input (parameters
  frozen), as an explainer must at least do for per-pair gradients (benchmarks/_common.py);
- reference loops, re-implemented here from the public reference code's structure (not their
  code): Chefer's CLIP notebook ``interpret`` (image repeated per prompt, a forward that records
  every block's graph with the parameters requiring grad, ``autograd.grad`` of the summed pair
  logits at the attention of the explained blocks, full n x n relevance products, image and
  text) and legrad-torch's wrapper (the text embedding and the blocks below the explained ones
  without a graph, the explained blocks with their attention written out, per explained layer a
  mean-pooled readout through the final norm and projection and its own ``autograd.grad`` at
  that layer's attention with ``retain_graph`` and ``create_graph``; image side). Both compute
  cliplens's maps (``tests/test_bench_references.py``);
- cliplens: ``chefer`` (default start layer: the last block; ``start_layer=0``: every block) and
  ``legrad`` with the reference's settings (``layers=2, pooling="mean"``, image tower);
  "chefer all rows" and "legrad rows" are the same calls through the per-pair-rows path the
  methods used before their one-graph path (``shared_graph = False``: the image repeated per
  prompt from the first explained block, one backward);
- "chefer ref 77", "legrad ref 77": the reference loops with every prompt padded to CLIP's
  77-token context, as the reference code's tokenizers do (the other reference cases pad to
  the longest prompt, as cliplens does);
- "score forward": the model scoring the image against the P prompts without a graph (each
  tower once, its default attention path): the floor under any method that reads the model's
  score, the reference loops included;
- "chefer eager" and "legrad eager": the same calls with the blocks before the first explained
  one on the eager attention path too (the path before they ran the fused kernel);
- "chefer probs", "chefer all probs", "legrad probs", "legrad all probs": the methods with
  their explained blocks on the eager path, keeping their probabilities (``kept_attention =
  False``: the path before those blocks ran fused and kept their queries, keys and values);
  "legrad all": ``layers=None``, every block;
- "rollout", "raw_attention", "gradcam", "sensitivity", "decomposition", "grad_eclip" and
  "chefer text" (chefer on the text tower alone) against the same calls with "probs": every
  block a run holds keeps its probabilities on the eager path, as before a run kept only the
  blocks its method reads (``AttentionReads``; the others now run the fused kernel and keep
  nothing) and read them kept;
- "chefer block", "grad_eclip block" and "gradcam block": the gradient at the last block's
  attention (gradcam: its input) through the whole block, as before it came through the
  readout token's row alone (``readout_attention_gradients``, ``readout_input_gradients``);
  "chefer 2" is chefer from the second-to-last block (``start_layer=-2``), and "chefer all
  block" and "chefer 2 block" take the last block whole, as before the blocks below started
  from the gradient at its input through the readout row;
- "chefer no stop", "grad_eclip no stop", "gradcam no stop" and "chefer text no stop": the
  towers run their last block whole (kept), as before they stopped in its attention and
  finished the embedding from the readout row (``AttentionReads.readout_block``: the explained
  towers whose gradient comes through that row, and a tower the call does not explain);
- "legrad block": each explained layer's gradient through the block's own backward, as before
  the mean-pooled readout's one cotangent per pair crossed the MLP's down-projection once
  (``legrad.mean_pooled_gradients``); "legrad both" is legrad's default call (both towers) and
  "legrad both block" the same through each block's own backward, as before the text side's
  layer readouts went through their end-of-text row alone (``readout_attention_gradients``).

Time: interleaved repeats, the median of per-repeat ratios (load changes hit both). Memory: on
CUDA the peak allocation above the loaded model; on the CPU the peak RSS of a fresh process.

    python benchmarks/bench_speed.py                       # CPU, P = 1, 8, 32
    python benchmarks/bench_speed.py --device cuda --prompts 1,8,32,128 --sizes 224,448,896
    python benchmarks/bench_speed.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import cliplens  # noqa: E402
import cliplens.adapters.hf_encoder as hf_encoder  # noqa: E402
from cliplens.adapters import HFClipAdapter  # noqa: E402
from cliplens.adapters.kept import EVERY_BLOCK  # noqa: E402
from cliplens.methods import REGISTRY  # noqa: E402

#: label -> (kind, options): "ours" runs cliplens, "ref" a reference loop
CASES = {
    "chefer": ("ours", {"method": "chefer"}),
    "chefer ref": ("ref", {"loop": "chefer", "start": -1}),
    "chefer all": ("ours", {"method": "chefer", "start_layer": 0}),
    "chefer all ref": ("ref", {"loop": "chefer", "start": 0}),
    "chefer all rows": ("ours", {"method": "chefer", "start_layer": 0, "per_pair_rows": True}),
    "legrad": ("ours", {"method": "legrad", "layers": 2, "pooling": "mean", "towers": ("image",)}),
    "legrad ref": ("ref", {"loop": "legrad", "layers": 2}),
    "legrad rows": ("ours", {"method": "legrad", "layers": 2, "pooling": "mean", "towers": ("image",), "per_pair_rows": True}),
    "chefer ref 77": ("ref", {"loop": "chefer", "start": -1, "context": 77}),
    "legrad ref 77": ("ref", {"loop": "legrad", "layers": 2, "context": 77}),
    "score forward": ("floor", {}),
    "chefer eager": ("ours", {"method": "chefer", "eager_blocks": True}),
    "chefer probs": ("ours", {"method": "chefer", "probs": True}),
    "chefer all probs": ("ours", {"method": "chefer", "start_layer": 0, "probs": True}),
    "legrad probs": ("ours", {"method": "legrad", "layers": 2, "pooling": "mean", "towers": ("image",), "probs": True}),
    "legrad all": ("ours", {"method": "legrad", "layers": None, "pooling": "mean", "towers": ("image",)}),
    "legrad all probs": ("ours", {"method": "legrad", "layers": None, "pooling": "mean", "towers": ("image",), "probs": True}),
    "legrad eager": ("ours", {"method": "legrad", "layers": 2, "pooling": "mean", "towers": ("image",), "eager_blocks": True}),
}
#: the blocks a method does not read, fused, against every block keeping its probabilities (--cases)
READ_CASES = {}
for _label, _opts in {
    "rollout": {"method": "rollout"},
    "raw_attention": {"method": "raw_attention"},
    "gradcam": {"method": "gradcam"},
    "sensitivity": {"method": "sensitivity"},
    "decomposition": {"method": "decomposition"},
    "grad_eclip": {"method": "grad_eclip"},
    "chefer text": {"method": "chefer", "towers": ("text",)},
}.items():
    READ_CASES[_label] = ("ours", _opts)
    READ_CASES[f"{_label} probs"] = ("ours", {**_opts, "probs": True})
#: the short ways through a block (the last block's readout row, legrad's layer readouts), against
#: the whole block (--cases)
BLOCK_CASES = {
    "grad_eclip block": ("ours", {"method": "grad_eclip", "whole_block": True, "no_stop": True}),
    "gradcam block": ("ours", {"method": "gradcam", "whole_block": True, "no_stop": True}),
    "chefer block": ("ours", {"method": "chefer", "whole_block": True, "no_stop": True}),
    "chefer all block": ("ours", {"method": "chefer", "start_layer": 0, "whole_block": True, "no_stop": True}),
    "chefer 2": ("ours", {"method": "chefer", "start_layer": -2}),
    "chefer 2 block": ("ours", {"method": "chefer", "start_layer": -2, "whole_block": True, "no_stop": True}),
    "grad_eclip no stop": ("ours", {"method": "grad_eclip", "no_stop": True}),
    "gradcam no stop": ("ours", {"method": "gradcam", "no_stop": True}),
    "chefer no stop": ("ours", {"method": "chefer", "no_stop": True}),
    "chefer text no stop": ("ours", {"method": "chefer", "towers": ("text",), "no_stop": True}),
    "legrad block": ("ours", {**CASES["legrad"][1], "whole_block": True}),
    "legrad both": ("ours", {"method": "legrad"}),
    "legrad both block": ("ours", {"method": "legrad", "whole_block": True}),
}
DEFAULT_CASES = list(CASES)
CASES.update(READ_CASES)
CASES.update(BLOCK_CASES)


def setup(size: int, device: str, dtype: torch.dtype):
    from transformers import CLIPConfig, CLIPModel

    base = C.build_clip("b16")
    cfg = base.config.to_dict()
    cfg["vision_config"]["image_size"] = size
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**{k: cfg[k] for k in ("text_config", "vision_config", "projection_dim")}))
    model = model.eval().to(device=device, dtype=dtype)
    adapter = HFClipAdapter(model, C.tokenizer(), name=f"random-b16-{size}")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return adapter, image


def _reference_forward(adapter, image, texts, context: int | None = None):
    """The image repeated per prompt, every block recorded with the parameters requiring grad;
    prompts padded to the longest (as cliplens does), or to ``context`` tokens (the reference
    code's tokenizers pad to CLIP's 77)."""
    model = adapter.model
    if context:
        batch = adapter.tokenizer(list(texts), padding="max_length", max_length=context, return_tensors="pt")
    else:
        batch = adapter.tokenize(texts)
    pixels = adapter.prepare_images([image])[0].pixel_values.repeat(len(texts), 1, 1, 1)
    model.set_attn_implementation("eager")
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=pixels,
        output_attentions=True,
        output_hidden_states=True,
    )
    return out, batch


def chefer_reference(adapter, image, texts, start: int, context: int | None = None):
    out, batch = _reference_forward(adapter, image, texts, context)
    y = out.logits_per_image.diagonal().sum()
    v_att, t_att = out.vision_model_output.attentions, out.text_model_output.attentions
    start_v = start % len(v_att)
    start_t = start % len(t_att)
    grads = torch.autograd.grad(y, list(v_att[start_v:]) + list(t_att[start_t:]))
    rows = []
    for atts, gs in ((v_att[start_v:], grads[: len(v_att) - start_v]), (t_att[start_t:], grads[len(v_att) - start_v :])):
        n = atts[0].shape[-1]
        R = torch.eye(n, dtype=atts[0].dtype, device=atts[0].device).expand(atts[0].shape[0], n, n).clone()
        for A, G in zip(atts, gs):
            R = R + torch.bmm((G * A).clamp(min=0).mean(1), R)
        rows.append(R)
    eot = batch.input_ids.argmax(-1)
    return rows[0][:, 0, 1:], rows[1][torch.arange(len(texts)), eot]


def _written_out_block(layer, x):
    """A transformers CLIP encoder layer with its attention written out, as legrad-torch's
    hooked attention does in the blocks it explains: (output, probabilities (rows, H, n, n))."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    rows, n, width = h.shape
    heads = attn.num_heads
    q, k, v = (
        proj(h).view(rows, n, heads, width // heads).transpose(1, 2)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    probs = ((q * attn.scale) @ k.transpose(-1, -2)).softmax(-1)
    x = x + attn.out_proj((probs @ v).transpose(1, 2).reshape(rows, n, width))
    return x + layer.mlp(layer.layer_norm2(x)), probs


def legrad_reference(adapter, image, texts, layers: int, context: int | None = None):
    """legrad-torch's wrapper (``LeWrapper``, ``compute_legrad_clip``): every parameter outside
    the explained image blocks frozen, so the text embedding and the blocks below run without a
    graph (on the model's own attention); the image repeated per prompt; the explained blocks
    with their attention written out; per layer the cosines of its mean-pooled readout with the
    texts, and an ``autograd.grad`` at its probabilities with ``retain_graph`` and
    ``create_graph``, as the wrapper calls it. Prompts padded to the longest, or to ``context``."""
    model = adapter.model
    if context:
        batch = adapter.tokenizer(list(texts), padding="max_length", max_length=context, return_tensors="pt")
    else:
        batch = adapter.tokenize(texts)
    vision = model.vision_model
    start = len(vision.encoder.layers) - layers
    pixels = adapter.prepare_images([image])[0].pixel_values.repeat(len(texts), 1, 1, 1)
    with torch.no_grad():
        out = model.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        text = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
        x = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers[:start]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x  # transformers before 5 return a tuple
    readouts, probs = [], []
    for layer in vision.encoder.layers[start:]:
        x, p = _written_out_block(layer, x)
        e = model.visual_projection(vision.post_layernorm(x.mean(1)))
        readouts.append(torch.nn.functional.normalize(e, dim=-1))
        probs.append(p)
    total = 0
    for e, p in zip(readouts, probs):
        (g,) = torch.autograd.grad((text * e).sum(), [p], retain_graph=True, create_graph=True)
        total = total + g.clamp(min=0).mean(1).mean(1)[:, 1:]
    return total


def every_block(method, adapter, towers, opts):
    """``Method.attention_reads`` as before a run kept only the blocks its method reads."""
    return {tower: EVERY_BLOCK for tower in adapter.num_layers}


def runner(adapter, image, texts, label: str):
    kind, opts = CASES.get(label, ("plain", {}))
    if kind == "plain":
        fn = lambda: C.plain_pass(adapter, image, texts)  # noqa: E731
    elif kind == "floor":
        fn = lambda: C.score_forward(adapter, image, texts)  # noqa: E731
    elif kind == "ours":
        opts = dict(opts)
        method = opts.pop("method")
        rows = opts.pop("per_pair_rows", False)
        eager = opts.pop("eager_blocks", False)
        probs = opts.pop("probs", False)
        whole = opts.pop("whole_block", False)
        no_stop = opts.pop("no_stop", False)

        def fn():
            cls = REGISTRY[method]
            shared, kept, paths = cls.shared_graph, cls.kept_attention, hf_encoder.IMPLEMENTATION
            module = sys.modules[cls.__module__]
            names = ("readout_attention_gradients", "readout_input_gradients", "mean_pooled_gradients")
            shorts = {n: getattr(module, n) for n in names if hasattr(module, n)}
            cls.shared_graph = shared and not rows
            cls.kept_attention = kept and not probs
            if probs:  # every block keeps its probabilities
                cls.attention_reads = every_block
            if eager:
                hf_encoder.IMPLEMENTATION = dict.fromkeys(paths, "eager")
            if whole:  # the explained blocks' gradients through the whole block
                for name in shorts:
                    setattr(module, name, lambda *args, **kwargs: None)
            if no_stop:  # the towers run their last block whole (kept, where they would stop)
                hf_encoder.IMPLEMENTATION = {**paths, "readout": hf_encoder.KEPT}
            try:
                cliplens.explain(adapter, image, texts, method=method, **opts)
            finally:
                cls.shared_graph = shared
                cls.kept_attention = kept
                if probs:
                    del cls.attention_reads
                hf_encoder.IMPLEMENTATION = paths
                for name, fn in shorts.items():
                    setattr(module, name, fn)
    else:
        loop = opts["loop"]

        def fn():
            flags = [(p, p.requires_grad) for p in adapter.model.parameters()]
            attn = adapter.model.config._attn_implementation
            try:
                for p, _ in flags:
                    p.requires_grad_(True)
                if loop == "chefer":
                    chefer_reference(adapter, image, texts, opts["start"], opts.get("context"))
                else:
                    legrad_reference(adapter, image, texts, opts["layers"], opts.get("context"))
            finally:
                for p, f in flags:
                    p.requires_grad_(f)
                adapter.model.set_attn_implementation(attn)

    return C.on_device(fn, adapter.device)


def prompts(P: int) -> list[str]:
    return [f"{C.PROMPTS[i % len(C.PROMPTS)]} #{i}" for i in range(P)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="1,8,32")
    ap.add_argument("--sizes", default="224")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.measure:
        size, label, P, dtype = args.measure
        adapter, image = setup(int(size), "cpu", getattr(torch, dtype))
        run = runner(adapter, image, prompts(int(P)), label)
        run()
        with C.PeakRSS() as peak:
            run()
        print(json.dumps({"peak_mb": peak.peak_mb}))
        return
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"random CLIP ViT-B/16 size, torch {torch.__version__}, {where}, {args.dtype}, repeats {args.repeats}")
    print("| px | P | case | s | plain s | x plain | x reference | MB | plain MB | mem x plain | mem x ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [c for c in args.cases.split(",") if c]
    for size in [int(s) for s in args.sizes.split(",")]:
        adapter, image = setup(size, args.device, dtype)
        for P in [int(p) for p in args.prompts.split(",")]:
            texts = prompts(P)
            plain = runner(adapter, image, texts, "plain")
            times, mems = {}, {}
            for label in cases:
                times[label] = C.paired_ratio(runner(adapter, image, texts, label), plain, args.repeats)
                if args.skip_memory:
                    continue
                for name in (label, "plain"):
                    if name in mems:
                        continue
                    if args.device == "cuda":
                        mems[name] = C.cuda_peak_mb(runner(adapter, image, texts, name))
                    else:
                        mems[name] = C.measure_peak_in_subprocess(
                            __file__, [str(size), name, str(P), args.dtype], threads=torch.get_num_threads()
                        )["peak_mb"]
            for label in cases:
                t, t_plain, ratio = times[label]
                base = label
                for suffix in (" rows", " probs", " block", " no stop"):
                    base = base.removesuffix(suffix)
                ref = f"{base} ref" if not label.endswith("ref") else None
                x_ref = f"{t / times[ref][0]:.2f}" if ref in times else ""
                mem = mems.get(label)
                m_plain = mems.get("plain")
                m_ref = f"{mem / mems[ref]:.2f}" if ref in mems and mem is not None else ""
                cells = (
                    [f"{mem:.0f}", f"{m_plain:.0f}", f"{mem / max(m_plain, 1e-9):.2f}", m_ref]
                    if mem is not None else ["", "", "", ""]
                )
                print(f"| {size} | {P} | {label} | {t:.3f} | {t_plain:.3f} | {ratio:.2f} | {x_ref} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
