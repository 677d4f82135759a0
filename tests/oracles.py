"""Slow, obvious float64 references of each method, written from the equations
(../shared/design/ALGORITHMS.md), keyed by method name, for every family.

An oracle sees a model only through the adapter's capture (the attention probabilities, block
streams and embeddings of ONE forward of ONE image or ONE prompt: what the capture tests check
against each model's own forward), and computes everything else itself: one pair at a time,
the pair's score from the embeddings by hand, gradients by a separate autograd call per pair,
full n x n matrices where the method is a matrix product, no batching, no row folds. The fast
paths share none of that code.

``ORACLES[method](adapter, images, texts, **options)`` returns ``(image_maps, token_scores)``:
(B, P, Gh, Gw) and (B, P, T) numpy arrays (T: the prompt's own tokens; None where the method
has no such side).
"""

from __future__ import annotations

import numpy as np
import torch

TARGETS = ("logit", "probability")


# ---- one pair at a time ------------------------------------------------------------------------


def _image_run(adapter, image, *, grad: bool):
    pixels = adapter.prepare_images([image])[0].pixel_values.double()
    with torch.set_grad_enabled(grad):
        return adapter.run_image(pixels)


def _text_run(adapter, batch, p: int, *, grad: bool):
    with torch.set_grad_enabled(grad):
        return adapter.run_text(batch.input_ids[p : p + 1], batch.attention_mask[p : p + 1])


def _score(adapter, img_e, txt_es, p: int, target: str) -> torch.Tensor:
    """The explained value of pair (image, prompt p) from the image embedding (1, D) and the
    embeddings of ALL prompts (list of (1, D)), written out: scale * cos (+ bias), then the
    target (softmax over the prompts / the pair's sigmoid)."""
    scale = adapter.logit_scale().double()
    bias = adapter.logit_bias()
    cos = [
        (img_e[0] @ t[0]) / (torch.sqrt((img_e[0] ** 2).sum()) * torch.sqrt((t[0] ** 2).sum())) for t in txt_es
    ]
    logits = torch.stack([scale * c + (0.0 if bias is None else bias.double()) for c in cos])
    if target == "logit":
        return logits[p]
    if adapter.pair_probability == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-logits[p]))
    return torch.exp(logits[p]) / torch.exp(logits).sum()


def _pairs(adapter, images, texts, target, *, image_grad: bool, text_grad: bool):
    """Yield (b, p, image run, text run of prompt p, y): fresh forwards for every pair."""
    batch = adapter.tokenize(texts)
    for b, image in enumerate(images):
        for p in range(len(texts)):
            with adapter.explaining():
                img = _image_run(adapter, image, grad=image_grad)
                runs = [_text_run(adapter, batch, q, grad=text_grad and q == p) for q in range(len(texts))]
                txt_es = [r.embeds if q == p else r.embeds.detach() for q, r in enumerate(runs)]
                img_e = img.embeds
                with torch.set_grad_enabled(image_grad or text_grad):
                    y = _score(adapter, img_e, txt_es, p, target)
                yield b, p, img, runs[p], y


def _start_row(run, grads_pool=None) -> torch.Tensor:
    """The readout row: one-hot at the readout token, or for a pooling head its attention
    (mean over heads and queries; weighted by a gradient when given: (G*A)^+ summed over queries)."""
    n = run.layout.valid.shape[1]
    r = int(run.layout.readout[0])
    if r >= 0:
        row = torch.zeros(n, dtype=torch.float64)
        row[r] = 1.0
        return row
    A = run.pool_attention[0].detach().double()  # (H, q, n)
    if grads_pool is None:
        return A.mean(dim=(0, 1))
    return torch.clamp(grads_pool[0] * A, min=0).mean(0).sum(0)


def _grid(run, row: np.ndarray) -> np.ndarray:
    gh, gw = run.layout.grid
    return row[run.layout.patches.cpu().numpy()].reshape(gh, gw)


def _tokens(run, row: np.ndarray) -> np.ndarray:
    return row[run.layout.valid[0].cpu().numpy()]


def _collect(images, texts, results) -> tuple[np.ndarray | None, np.ndarray | None]:
    """{(b, p): (grid map or None, token row or None)} -> arrays; token rows NaN-padded."""
    B, P = len(images), len(texts)
    maps = [[results[b, p][0] for p in range(P)] for b in range(B)]
    toks = [[results[b, p][1] for p in range(P)] for b in range(B)]
    image_maps = None if maps[0][0] is None else maps
    token_scores = None
    if toks[0][0] is not None:
        T = max(len(t) for row in toks for t in row)
        token_scores = np.full((B, P, T), np.nan)
        for b in range(B):
            for p in range(P):
                token_scores[b, p, : len(toks[b][p])] = toks[b][p]
    return image_maps, token_scores


def _first(value, num_layers: int, default: int) -> int:
    if value is None:
        return default
    return value + num_layers if value < 0 else value


# ---- the methods -----------------------------------------------------------------------------


def oracle_chefer(adapter, images, texts, target="logit", start_layer=None):
    """R = I; for l >= start: R += mean_h (dy/dA * A)^+ @ R (full matrices); the readout row."""
    results = {}
    for b, p, img, txt, y in _pairs(adapter, images, texts, target, image_grad=True, text_grad=True):
        out = []
        for run in (img, txt):
            L = len(run.attentions)
            wrt = list(run.attentions) + ([run.pool_attention] if run.pool_attention is not None else [])
            grads = torch.autograd.grad(y, wrt, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(a) if g is None else g for g, a in zip(grads, wrt)]
            n = run.attentions[0].shape[-1]
            R = torch.eye(n, dtype=torch.float64)
            for l in range(_first(start_layer, L, L - 1), L):
                A, G = run.attentions[l][0].detach(), grads[l][0]
                abar = sum(torch.clamp(G[h] * A[h], min=0) for h in range(A.shape[0])) / A.shape[0]
                R = R + abar @ R
            row = _start_row(run, grads[L] if run.pool_attention is not None else None) @ R
            out.append(row.numpy())
        results[b, p] = (_grid(img, out[0]), _tokens(txt, out[1]))
    return _collect(images, texts, results)


def oracle_rollout(adapter, images, texts, start_layer=None):
    """R = prod over l >= start of rownormalise(mean_h A^l + I), full matrices; the readout row."""
    results = {}
    for b, p, img, txt, _ in _pairs(adapter, images, texts, "logit", image_grad=False, text_grad=False):
        out = []
        for run in (img, txt):
            L, n = len(run.attentions), run.attentions[0].shape[-1]
            R = torch.eye(n, dtype=torch.float64)
            for A in run.attentions[_first(start_layer, L, 0) :]:
                ahat = A[0].double().mean(0) + torch.eye(n, dtype=torch.float64)
                R = (ahat / ahat.sum(-1, keepdim=True)) @ R
            out.append((_start_row(run) @ R).numpy())
        results[b, p] = (_grid(img, out[0]), _tokens(txt, out[1]))
    return _collect(images, texts, results)


def oracle_raw_attention(adapter, images, texts, layer=None):
    """The readout row of mean_h A^layer."""
    results = {}
    for b, p, img, txt, _ in _pairs(adapter, images, texts, "logit", image_grad=False, text_grad=False):
        out = []
        for run in (img, txt):
            L = len(run.attentions)
            A = run.attentions[_first(layer, L, L - 1)][0].double().mean(0)
            out.append((_start_row(run) @ A).numpy())
        results[b, p] = (_grid(img, out[0]), _tokens(txt, out[1]))
    return _collect(images, texts, results)


def oracle_gradcam(adapter, images, texts, target="logit", layer=None):
    """F = patch tokens entering block ``layer``; alpha_c = mean_j dy/dF_jc; (sum_c alpha_c F_c)^+."""
    results = {}
    for b, p, img, txt, y in _pairs(adapter, images, texts, target, image_grad=True, text_grad=False):
        L = len(img.block_inputs)
        F = img.block_inputs[_first(layer, L, L - 1)]
        (G,) = torch.autograd.grad(y, [F])
        idx = img.layout.patches
        f, g = F[0, idx].detach(), G[0, idx]
        alpha = g.mean(0)
        cam = torch.stack([torch.clamp((f[j] * alpha).sum(), min=0) for j in range(f.shape[0])])
        results[b, p] = (_grid(img, _scatter(img, cam)), None)
    return _collect(images, texts, results)


def _scatter(run, patch_values: torch.Tensor) -> np.ndarray:
    """Per-patch values -> a per-token row (zeros elsewhere), so _grid reads them back."""
    row = np.zeros(run.layout.valid.shape[1])
    row[run.layout.patches.cpu().numpy()] = patch_values.detach().numpy()
    return row


def oracle_legrad(
    adapter, images, texts, target="logit", layers=2, pooling="mean", correction="auto", correction_threshold=0.8
):
    """Per explained block l: s^l = the target on block l's output read out as the last block
    (``pooling="mean"`` on a class-token image tower: mean over all tokens, then ``adapter.head``;
    otherwise ``adapter.readout_with_attention``), the other tower's final embedding constant;
    map^l = mean over heads and valid query rows of (ds^l / dA^l)^+ (for a pooling head: of its
    attention in that readout); the map is the sum over l. Each layer gets its own backward (no
    detached blocks). On the text side the other prompts' logits in a probability are their
    layer-l logits too. Correction (image; 'auto' = pooled towers): the same map for the cosine
    with the normalised embedding of "a photo of a"; patches where its min-max exceeds the
    threshold are set to 0 (loops over patches)."""
    batch = adapter.tokenize(texts)
    empty_batch = adapter.tokenize(["a photo of a"])
    results = {}
    for b, image in enumerate(images):
        for p in range(len(texts)):
            out = []
            with adapter.explaining():
                img = _image_run(adapter, image, grad=True)
                txts = [_text_run(adapter, batch, q, grad=True) for q in range(len(texts))]
                with torch.no_grad():
                    t_empty = adapter.run_text(empty_batch.input_ids, empty_batch.attention_mask).embeds[0].double()
                t_empty = t_empty / torch.sqrt((t_empty**2).sum())
                for tower, run in (("image", img), ("text", txts[p])):
                    L = len(run.attentions)
                    chosen = range(L) if layers is None else range(max(0, L - layers), L)
                    pooled_tower = int(run.layout.readout[0]) < 0
                    correct = tower == "image" and (correction == "on" or (correction == "auto" and pooled_tower))
                    total = np.zeros(run.layout.valid.shape[1])
                    empty = np.zeros(run.layout.valid.shape[1])
                    for l in chosen:
                        hidden = run.block_outputs[l]
                        if tower == "image" and pooling == "mean" and not pooled_tower:
                            e, pool = adapter.head(tower, hidden.mean(1)), None
                        else:
                            e, pool = adapter.readout_with_attention(tower, hidden, run.layout)
                        if tower == "image":
                            tes = [t.embeds.detach() for t in txts]
                            s = _score(adapter, e, tes, p, target)
                        else:
                            # the other prompts enter at the same layer l, as constants
                            tes = [e if q == p else _layer_embed(adapter, t, l) for q, t in enumerate(txts)]
                            s = _score(adapter, img.embeds.detach(), tes, p, target)
                        wrt = run.attentions[l] if pool is None else pool
                        scores = [s]
                        if correct:
                            scores.append((e[0] @ t_empty) / torch.sqrt((e[0] ** 2).sum()))
                        for k, sc in enumerate(scores):
                            (G,) = torch.autograd.grad(sc, [wrt], retain_graph=True, allow_unused=True)
                            G = torch.zeros_like(wrt) if G is None else G
                            pos = torch.clamp(G[0], min=0).mean(0)  # (q, n)
                            if pool is None:
                                valid = run.layout.valid[0]
                                pos = pos[valid]
                            if k == 0:
                                total += pos.mean(0).detach().numpy()
                            else:
                                empty += pos.mean(0).detach().numpy()
                    if correct:
                        idx = run.layout.patches.cpu().numpy()
                        ev = empty[idx]
                        if ev.max() > ev.min():
                            for j, v in zip(idx, ev):
                                if (v - ev.min()) / (ev.max() - ev.min()) > correction_threshold:
                                    total[j] = 0.0
                    out.append(total)
            results[b, p] = (_grid(img, out[0]), _tokens(txts[p], out[1]))
    return _collect(images, texts, results)


def _layer_embed(adapter, run, l: int) -> torch.Tensor:
    return adapter.readout("text", run.block_outputs[l], run.layout).detach()


def oracle_sensitivity(adapter, images, texts, target="logit", variant="grad_norm"):
    """grad_norm: |dy/dx_j| per token of the embedding input; grad_x_input: sum_c g_jc x_jc."""
    results = {}
    for b, p, img, txt, y in _pairs(adapter, images, texts, target, image_grad=True, text_grad=True):
        gi, gt = torch.autograd.grad(y, [img.input_embeds, txt.input_embeds])
        out = []
        for run, g in ((img, gi), (txt, gt)):
            x = run.input_embeds.detach()[0]
            g = g[0]
            vals = [
                torch.sqrt((g[j] ** 2).sum()) if variant == "grad_norm" else (g[j] * x[j]).sum()
                for j in range(g.shape[0])
            ]
            out.append(torch.stack(vals).detach().numpy())
        results[b, p] = (_grid(img, out[0]), _tokens(txt, out[1]))
    return _collect(images, texts, results)


def oracle_grad_eclip(adapter, images, texts, target="logit", towers=("image", "text")):
    """At the last block: o = sum_h sum_j A_hrj V_hj + b_O at the readout token r, made a leaf;
    y recomputed from it (residual, MLP branch, head, pair score); g = dy/do;
    w_hj = min-max over the kept tokens j of cos(q_hr, k_hj); map_j = relu(sum_h w_hj <g, V_hj>)
    (loops over heads and tokens). Kept tokens: patches (image), real tokens (text)."""
    batch = adapter.tokenize(texts)
    results = {}

    def tail(run, o):
        L = len(run.attentions)
        r = int(run.layout.readout[0])
        x = run.block_inputs[L - 1][0, r].detach().double()
        z = x + o
        out = z + adapter.mlp_output(run.tower, L - 1, z[None, None])[0, 0]
        return adapter.head(run.tower, out[None])

    def tower_map(run, score):
        L = len(run.attentions)
        r = int(run.layout.readout[0])
        x = run.block_inputs[L - 1].detach().double()
        V = adapter.attention_value_heads(run.tower, L - 1, x)[0].detach()  # (H, n, C)
        A = run.attentions[L - 1][0].detach().double()
        H, n = A.shape[0], A.shape[-1]
        o = sum(A[h, r, j] * V[h, j] for h in range(H) for j in range(n))
        bias = adapter.attention_out_bias(run.tower, L - 1)
        if bias is not None:
            o = o + bias.double()
        o = o.detach().requires_grad_(True)
        e = tail(run, o)
        assert torch.allclose(e, run.embeds.double(), rtol=1e-8, atol=1e-10), "tail does not rebuild the embedding"
        (g,) = torch.autograd.grad(score(e), [o])
        q, k = adapter.attention_qk(run.tower, L - 1, x)
        keep = (run.layout.content if run.tower == "image" else run.layout.valid)[0]
        kept = [j for j in range(n) if keep[j]]
        vals = np.zeros(n)
        for h in range(H):
            cos = {j: float((q[0, h, r] @ k[0, h, j]) / (q[0, h, r].norm() * k[0, h, j].norm())) for j in kept}
            lo, hi = min(cos.values()), max(cos.values())
            for j in kept:
                w = (cos[j] - lo) / (hi - lo) if hi > lo else 0.0
                vals[j] += w * float(g @ V[h, j])
        return np.maximum(vals, 0.0)

    for b, image in enumerate(images):
        for p in range(len(texts)):
            with adapter.explaining(), torch.no_grad():
                img = _image_run(adapter, image, grad=False)
                txts = [_text_run(adapter, batch, q, grad=False) for q in range(len(texts))]
            with adapter.explaining(), torch.enable_grad():
                tes = [t.embeds.detach().double() for t in txts]
                im = tower_map(img, lambda e: _score(adapter, e, tes, p, target)) if "image" in towers else None
                tx = tower_map(
                    txts[p],
                    lambda e: _score(
                        adapter, img.embeds.detach().double(), [e if q == p else t for q, t in enumerate(tes)], p, target
                    ),
                )
            results[b, p] = (None if im is None else _grid(img, im), _tokens(txts[p], tx))
    return _collect(images, texts, results)


ORACLES = {
    "grad_eclip": oracle_grad_eclip,
    "chefer": oracle_chefer,
    "rollout": oracle_rollout,
    "raw_attention": oracle_raw_attention,
    "gradcam": oracle_gradcam,
    "legrad": oracle_legrad,
    "sensitivity": oracle_sensitivity,
}


def _frozen_parts(adapter, run):
    """Per-token embedding-space terms and the constant of one tower run (one row), by loops:
    term(l, h, j) = a^{l,h}_{r j} V^{l,h}_j; every real token carries L*H shares of the frozen
    readout's constant W_p beta + b_p split over K = 1 + L*H*n_valid + biases + L terms."""
    parts = adapter.readout_parts(run.tower)
    r = int(run.layout.readout[0])
    z = run.block_outputs[-1][0, r].detach().double()
    sigma = torch.sqrt(((z - z.mean()) ** 2).mean() + parts.eps)
    gamma, beta = parts.norm_weight.double(), parts.norm_bias.double()
    Wp = parts.proj_weight.double()
    const = Wp @ beta + (0.0 if parts.proj_bias is None else parts.proj_bias.double())
    L, H = len(run.attentions), run.attentions[0].shape[1]
    valid = run.layout.valid[0]
    n = valid.shape[0]
    biases = [adapter.attention_out_bias(run.tower, l) for l in range(L)]
    K = 1 + L * H * int(valid.sum()) + sum(b is not None for b in biases) + L

    def embed(t, shares):
        return Wp @ (gamma * (t - t.mean()) / sigma) + shares * const / K

    tok = [torch.zeros_like(z) for _ in range(n)]
    rest = run.block_inputs[0][0, r].detach().double().clone()
    for l in range(L):
        x = run.block_inputs[l].detach().double()
        V = adapter.attention_value_heads(run.tower, l, x)[0]  # (H, n, C)
        A = run.attentions[l][0].detach().double()
        out = torch.zeros_like(z)
        for h in range(H):
            for j in range(n):
                tok[j] = tok[j] + A[h, r, j] * V[h, j]
                out = out + A[h, r, j] * V[h, j]
        if biases[l] is not None:
            out = out + biases[l].double()
            rest = rest + biases[l].double()
        rest = rest + adapter.mlp_output(run.tower, l, (x[0, r] + out)[None, None])[0, 0]
    tokens = [embed(tok[j], L * H if valid[j] else 0) for j in range(n)]
    constant = embed(rest, K - L * H * int(valid.sum()))
    return tokens, constant


def oracle_interactions(adapter, images, texts):
    """interactions[t, i] = scale <c_i, d_t> / (|e_I| |e_T|), patches i, real tokens t (loops)."""
    batch = adapter.tokenize(texts)
    results = {}
    for b, image in enumerate(images):
        for p in range(len(texts)):
            with adapter.explaining(), torch.no_grad():
                img = _image_run(adapter, image, grad=False)
                txt = _text_run(adapter, batch, p, grad=False)
                c, _ = _frozen_parts(adapter, img)
                d, _ = _frozen_parts(adapter, txt)
            k = adapter.logit_scale().double() / (img.embeds[0].double().norm() * txt.embeds[0].double().norm())
            patches = img.layout.patches.tolist()
            valid = txt.layout.valid[0]
            T = int(valid.sum())
            M = np.array([[float(k * (c[i] @ d[t])) for i in patches] for t in range(T)])
            gh, gw = img.layout.grid
            results[b, p] = M.reshape(T, gh, gw)
    return results


def oracle_jacobian_interactions(adapter, images, texts):
    """scale * sum_d G_I[d, i] G_T[d, t], G[d, j] = <d unit(e)[d] / d x_j, x_j>: one backward per
    dimension d, one image and one prompt at a time."""
    batch = adapter.tokenize(texts)

    def per_dim(run):
        u = run.embeds[0] / torch.sqrt((run.embeds[0] ** 2).sum())
        x = run.input_embeds
        rows = []
        for d in range(u.shape[0]):
            (g,) = torch.autograd.grad(u[d], [x], retain_graph=True)
            rows.append((g[0] * x[0].detach()).sum(-1))
        return torch.stack(rows)  # (D, n)

    results = {}
    for b, image in enumerate(images):
        for p in range(len(texts)):
            with adapter.explaining():
                img = _image_run(adapter, image, grad=True)
                txt = _text_run(adapter, batch, p, grad=True)
                gi, gt = per_dim(img), per_dim(txt)
            scale = adapter.logit_scale().double()
            patches = img.layout.patches.tolist()
            T = int(txt.layout.valid[0].sum())
            M = np.array([[float(scale * (gi[:, i] @ gt[:, t])) for i in patches] for t in range(T)])
            gh, gw = img.layout.grid
            results[b, p] = M.reshape(T, gh, gw)
    return results
