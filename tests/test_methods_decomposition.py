"""Exact decomposition: a float64 oracle that lists every term with plain loops over layers,
heads and tokens from the model's weights, freezes the final norm, splits its bias over the
terms and projects each; completeness in float64 and float32; the adapter's linear pieces."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from conftest import clip_tokenizer, make_tiny_clip, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


def tower_terms(tower, hidden_states, attentions, row, r, n_valid):
    """[(kind, layer, head, token, vector)] whose sum is the readout token's final stream."""
    terms = [("embed", -1, -1, -1, hidden_states[0][row, r])]
    for l, layer in enumerate(tower.encoder.layers):
        X = hidden_states[l][row]
        att = layer.self_attn
        H, d = att.num_heads, att.head_dim
        lnX = layer.layer_norm1(X)
        A = attentions[l][row]
        acc = torch.zeros_like(X[0])
        for h in range(H):
            Wo_h = att.out_proj.weight[:, h * d : (h + 1) * d]
            for j in range(n_valid):
                v = (att.v_proj.weight @ lnX[j] + att.v_proj.bias)[h * d : (h + 1) * d]
                t = A[h, r, j] * (Wo_h @ v)
                terms.append(("head", l, h, j, t))
                acc = acc + t
        terms.append(("bias", l, -1, -1, att.out_proj.bias))
        mid = X[r] + acc + att.out_proj.bias
        terms.append(("mlp", l, -1, -1, layer.mlp(layer.layer_norm2(mid))))
    return terms


def frozen_embeddings(terms, z, norm, proj):
    """Each term through the final norm frozen at z's statistics, bias split evenly, projected."""
    K = len(terms)
    mu, sigma = z.mean(), (z.var(unbiased=False) + norm.eps).sqrt()
    del mu  # each term is centred by its own mean (the sum of those means is mu)
    out = []
    for *_, t in terms:
        normed = norm.weight * (t - t.mean()) / sigma + norm.bias / K
        out.append(proj.weight @ normed + (proj.bias / K if proj.bias is not None else 0.0))
    return out


def oracle(model, adapter, images, texts, versus=None):
    m = copy.deepcopy(model).double()
    m.set_attn_implementation("eager")
    m.eval()
    batch = adapter.tokenize(texts)
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images]).double()
    scale = m.logit_scale.exp()
    eots = adapter._readout_positions(batch.input_ids)
    B, P = len(images), len(texts)
    res = {
        "map": np.zeros((B, P, 16)),
        "heads": np.zeros((B, P, 3, 4)),
        "mlp": np.zeros((B, P, 3)),
        "bias": np.zeros((B, P, 3)),
        "embed": np.zeros((B, P)),
        "tokens": np.full((B, P, batch.input_ids.shape[1]), np.nan),
        "t_heads": np.zeros((B, P, 2, 4)),
        "head_emb": np.zeros((B, 3, 4, 16)),
        "sum_err": [],
        "img": None,
    }
    with torch.no_grad():
        vout = m.vision_model(
            pixel_values=pixels,
            output_attentions=True,
            output_hidden_states=True,
            interpolate_pos_encoding=True,
        )
        tout = m.text_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_attentions=True,
            output_hidden_states=True,
        )
        img = m.visual_projection(vout.pooler_output)
        txt = m.text_projection(tout.pooler_output)
        i_hat, t_hat = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        for b in range(B):
            terms = tower_terms(m.vision_model, vout.hidden_states, vout.attentions, b, 0, 17)
            embs = frozen_embeddings(
                terms, vout.hidden_states[-1][b, 0], m.vision_model.post_layernorm, m.visual_projection
            )
            res["sum_err"].append(((sum(embs) - img[b]).norm() / img[b].norm()).item())
            for (kind, l, h, j, _), e in zip(terms, embs):
                if kind == "head":
                    res["head_emb"][b, l, h] += e.numpy()
            for p in range(P):
                u = t_hat[p] - (t_hat[versus] if versus is not None else 0.0)
                for (kind, l, h, j, _), e in zip(terms, embs):
                    c = (scale * (e @ u) / img[b].norm()).item()
                    if kind == "head":
                        res["heads"][b, p, l, h] += c
                        if j >= 1:
                            res["map"][b, p, j - 1] += c
                    elif kind == "mlp":
                        res["mlp"][b, p, l] += c
                    elif kind == "bias":
                        res["bias"][b, p, l] += c
                    else:
                        res["embed"][b, p] += c
        for p in range(P):
            r = int(eots[p])
            terms = tower_terms(m.text_model, tout.hidden_states, tout.attentions, p, r, r + 1)
            embs = frozen_embeddings(
                terms, tout.hidden_states[-1][p, r], m.text_model.final_layer_norm, m.text_projection
            )
            res["sum_err"].append(((sum(embs) - txt[p]).norm() / txt[p].norm()).item())
            for b in range(B):
                res["tokens"][b, p, : r + 1] = 0.0
                for (kind, l, h, j, _), e in zip(terms, embs):
                    c = (scale * (e @ i_hat[b]) / txt[p].norm()).item()
                    if kind == "head":
                        res["tokens"][b, p, j] += c
                        res["t_heads"][b, p, l, h] += c
    return res


def explain(model, images, texts, **kw):
    adapter = HFClipAdapter(model, clip_tokenizer(), name="tiny")
    return cliplens.explain(adapter, images, texts, method="decomposition", **kw), adapter


@pytest.mark.parametrize("target", ["logit", "contrast"])
def test_decomposition_matches_float64_oracle(target):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1), random_image(2)]
    tgt = "contrast:1" if target == "contrast" else target
    ex, adapter = explain(model, images, TEXTS, target=tgt)
    ref = oracle(model, adapter, images, TEXTS, versus=1 if target == "contrast" else None)
    assert max(ref["sum_err"]) < 1e-12  # the oracle's own terms add up to the embeddings
    X = ex.extras
    np.testing.assert_allclose(ex.image_maps.reshape(2, 3, 16), ref["map"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X["head_terms"], ref["heads"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X["mlp_terms"], ref["mlp"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X["attn_bias_terms"], ref["bias"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X["embedding_term"], ref["embed"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X["head_embeddings"], ref["head_emb"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ex.token_scores, ref["tokens"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X["text_head_terms"], ref["t_heads"], rtol=1e-9, atol=1e-12)
    # completeness: the shares add up to the explained value
    total = (
        X["embedding_term"]
        + X["head_terms"].sum((2, 3))
        + X["attn_bias_terms"].sum(2)
        + X["mlp_terms"].sum(2)
    )
    np.testing.assert_allclose(total, ex.target_values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        ex.image_maps.sum((2, 3)) + X["other_tokens_term"], X["head_terms"].sum((2, 3)), rtol=1e-9
    )
    np.testing.assert_allclose(X["dims"].sum(-1), ex.target_values, rtol=1e-9, atol=1e-12)
    for key in ("delta_embedding", "delta_similarity", "text_delta_embedding", "text_delta_similarity"):
        assert X[key].max() < 1e-5, key
    if target == "logit":
        text_total = (
            np.nansum(ex.token_scores, -1)
            + X["text_attn_bias_terms"].sum(2)
            + X["text_mlp_terms"].sum(2)
            + X["text_embedding_term"]
        )
        np.testing.assert_allclose(text_total, ex.logits, rtol=1e-9)
    else:
        np.testing.assert_allclose(ex.image_maps[:, 1], 0.0, atol=1e-15)  # prompt 1 against itself


@pytest.mark.parametrize("kw", [{}, {"width": 64, "heads": 8, "vision_layers": 4, "image_size": 48}])
def test_decomposition_complete_in_float32(kw):
    model = make_tiny_clip(dtype=torch.float32, **kw)
    ex, _ = explain(model, [random_image(1), random_image(5, size=(80, 40))], TEXTS)
    for key in ("delta_embedding", "delta_similarity", "text_delta_embedding", "text_delta_similarity"):
        assert ex.extras[key].max() < 1e-4, (key, ex.extras[key].max())


def test_decomposition_refuses_probability():
    model = make_tiny_clip()
    with pytest.raises(cliplens.InputError, match="not additive"):
        explain(model, [random_image(1)], ["a cat", "a dog"], target="probability")


def test_adapter_linear_pieces_rebuild_each_block():
    """The contract's value heads, attention bias and MLP branch rebuild every block's output
    at every token."""
    model = make_tiny_clip(dtype=torch.float64)
    adapter = HFClipAdapter(model, clip_tokenizer(), name="tiny")
    pixels = torch.stack([adapter.preprocess(random_image(1))[0]]).double()
    with adapter.explaining(), torch.no_grad():
        run = adapter.run_image(pixels)
        for l, (x, A, out) in enumerate(zip(run.block_inputs, run.attentions, run.block_outputs)):
            V = adapter.attention_value_heads("image", l, x)
            attn_out = torch.einsum("bhij,bhjc->bic", A, V) + adapter.attention_out_bias("image", l)
            mid = x + attn_out
            rebuilt = mid + adapter.mlp_output("image", l, mid)
            torch.testing.assert_close(rebuilt, out, rtol=1e-12, atol=1e-12)
        parts = adapter.readout_parts("image")
        z = run.block_outputs[-1][:, 0]
        normed = torch.nn.functional.layer_norm(
            z, z.shape[-1:], parts.norm_weight, parts.norm_bias, parts.eps
        )
        torch.testing.assert_close(normed @ parts.proj_weight.T, run.embeds)


def test_a_bug_inside_the_linear_pieces_is_not_turned_into_a_refusal(monkeypatch):
    """decomposition used to catch every NotImplementedError (torch's too) and report "not
    available for this family"; support is now decided by capability flags before anything
    runs, and an error raised while computing propagates as itself."""
    from conftest import hf_clip_factory

    adapter = hf_clip_factory(seed=0)

    def broken(*args, **kwargs):
        raise NotImplementedError("an operator without a kernel")

    monkeypatch.setattr(adapter, "attention_value_heads", broken)
    with pytest.raises(NotImplementedError, match="without a kernel"):
        cliplens.explain(adapter, [random_image(1)], ["a cat"], method="decomposition")


# ---- SigLIP / SigLIP 2: split at the pooling head ------------------------------------------------


@pytest.mark.parametrize("family", ["hf-siglip", "hf-siglip2"])
@pytest.mark.parametrize("target", ["logit", "contrast:1"])
def test_siglip_image_tower_split_at_the_pooling_head(family, target):
    """embed = sum_{h,j} P_hj U_hj + b_O + MLP(.), by loops in float64 from the head's own
    modules (nn.MultiheadAttention weights read here, not through the adapter); each patch's
    share is scale <sum_h P_hj U_hj, u> / |embed|; complete to 1e-10."""
    from conftest import ADAPTER_FACTORIES

    adapter = dict(ADAPTER_FACTORIES)[family](seed=0, dtype=torch.float64)
    images, texts = [random_image(1), random_image(2)], ["a red triangle", "cat"]
    ex = cliplens.explain(adapter, images, texts, method="decomposition", target=target)
    assert np.nanmax(ex.extras["delta_embedding"]) < 1e-10
    assert np.nanmax(ex.extras["delta_similarity"]) < 1e-10
    assert np.nanmax(ex.extras["text_delta_similarity"]) < 1e-10
    vm = adapter.model.vision_model
    mha = vm.head.attention
    C, H = mha.embed_dim, mha.num_heads
    d = C // H
    batch = adapter.tokenize(texts)
    with adapter.explaining(), torch.no_grad():
        t = adapter.run_text(batch.input_ids, batch.attention_mask).embeds
        t_hat = t / t.norm(dim=-1, keepdim=True)
        for b, image in enumerate(images):
            run = adapter.run_image(adapter.prepare_images([image])[0].pixel_values)
            x = vm.post_layernorm(run.block_outputs[-1])[0]  # (n, C)
            Wq, Wk, Wv = mha.in_proj_weight.split(C)
            bq, bk, bv = mha.in_proj_bias.split(C)
            q = vm.head.probe[0, 0] @ Wq.T + bq
            k = x @ Wk.T + bk
            v = x @ Wv.T + bv
            n = x.shape[0]
            terms = torch.zeros(n, C, dtype=torch.float64)
            for h in range(H):
                sl = slice(h * d, (h + 1) * d)
                p_h = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(d), 0)
                for j in range(n):
                    terms[j] += p_h[j] * (mha.out_proj.weight[:, sl] @ v[j, sl])
            a = terms.sum(0) + mha.out_proj.bias
            embed = a + vm.head.mlp(vm.head.layernorm(a))
            np.testing.assert_allclose(embed.numpy(), run.embeds[0].numpy(), rtol=1e-10, atol=1e-12)
            for p in range(len(texts)):
                u = t_hat[p] - (t_hat[1] if target == "contrast:1" else 0.0)
                want = adapter.logit_scale() * (terms @ u) / embed.norm()
                gh, gw = run.layout.grid
                np.testing.assert_allclose(
                    np.asarray(ex.image_maps[b][p]).ravel(), want.numpy(), rtol=1e-8, atol=1e-12
                )
    assert ex.extras["pool_head_terms"][0].shape[-1] == H
