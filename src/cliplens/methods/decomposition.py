"""Exact additive decomposition of the embedding into per-(layer, head, token) terms, dotted
with the other tower's normalised embedding: the seed blog's "forward tracing", done so the
parts sum to the whole.

For a tower that reads out token r (class token / end-of-text token), the residual stream z
at r leaving the last block is exactly

    z = x_r                                            (the stream entering block 0; for HF
                                                        CLIP's image tower that is AFTER
                                                        pre_layrnorm)
      + sum_l sum_h sum_j A^{l,h}_{rj} V^{l,h}_j       (V: head h's value of token j mapped by
                                                        its slice of W_O; adapter contract
                                                        ``attention_value_heads``)
      + sum_l b_O^l                                    (attention output bias)
      + sum_l MLP^l(.)_r                               (the MLP branch at r)

With the final norm frozen at its observed statistics (mean mu and scale sigma of z), the
readout ``embed = W_p (gamma * (z - mu) / sigma + beta) + b_p`` is affine in z. Centring is
linear, so each term t is centred by its own mean; the constant ``W_p beta + b_p`` belongs to
no term and is split evenly over the K terms (K = 1 + L*H*n_valid + L [+ L biases]):

    e(t) = W_p (gamma * (t - mean(t)) / sigma) + (W_p beta + b_p) / K

and the e(t) sum to the embedding exactly (to float rounding). Each term's share of the
explained logit is ``logit_scale * <e(t), u> / |embed|`` with u the other tower's normalised
embedding; the shares sum to the logit (minus a logit bias, for sigmoid models).

Image map: per patch j, the sum over layers and heads of its (l, h, j) terms. Text scores: the
same per token on the text tower (against the normalised image embedding). Extras (image;
the text tower's carry a ``text_`` prefix):

- ``head_terms`` (B, P, L, H): each head's share, summed over all its tokens;
- ``embedding_term``, ``other_tokens_term`` (B, P): the block-0 input's share, and the share
  of token columns that are not patches (the class token);
- ``attn_bias_terms``, ``mlp_terms`` (B, P, L);
- ``norm_bias_share`` (B, P): the total share of the split constant (every token term carries
  1/K of it, so a uniform offset of ``L*H/K`` times it sits in each patch value);
- ``dims`` (B, P, D): per embedding dimension ``logit_scale * i_d * u_d / (|i| |u|)``, which
  sums to the explained logit: which dimensions carry the match;
- ``head_embeddings`` (B, L, H, D): each head's term in embedding space (TextSpan-style);
- ``delta_embedding`` (B, P): |sum of all terms in embedding space - embedding| / |embedding|;
- ``delta_similarity`` (B, P): |sum of shares + constants - y| / max(|y|, |pair logit|).

Targets: ``logit`` is explained exactly. ``contrast`` is exact on the image side (the image
terms are dotted with ``t_p/|t_p| - t_q/|t_q|``); on the text side prompt p's terms explain its
own logit and the other prompt's logit is a constant in the completeness check. Other targets
(``probability``: not additive in the embedding) are refused with an InputError rather than
answered with a first-order approximation.

Paper: Y. Gandelsman, A. Efros, J. Steinhardt, "Interpreting CLIP's Image Representation via
Text-Based Decomposition", ICLR 2024 (TextSpan).

Differences from the reference (yossigandelsman/clip_text_span, ``prs_hook.py``): the
reference hooks the model's internals and divides the final norm's bias and mean by the
number of components it collects; here the terms come from the adapter contract, each term is
centred by its own mean (exact), the bias constant is split over every term, the text tower is
decomposed too, and completeness is returned with every call.

Towers that pool with an attention head (SigLIP / SigLIP 2 image towers: capability
``pool_split``) are split at the head instead (:class:`PooledDecomposition`): per (head, token)
the head's probability times that token's W_O-mapped value, plus the head's output bias and its
residual MLP as one lumped term each (the MLP is not linear); the head has no projection after
it, so the shares ``scale * <t, u> / |embed|`` sum to the logit exactly. Extras for such a
tower: ``pool_head_terms`` (B, P, H), ``pool_bias_term``, ``pool_mlp_term`` (B, P), ``dims``,
``other_tokens_term`` (0: every token is a patch), the deltas; no per-block terms.

Cost: one forward of each tower over the B images and P prompts (no B*P replication, no
backward) plus, per block, the value heads of the readout tower (about 2 n C^2 multiply-adds:
one sixth of a block's forward) and the MLP of one token.
"""

from __future__ import annotations

import torch

from ..adapters.base import ModelAdapter, TowerRun
from ..adapters.kept import query_rows
from ..errors import InputError
from ..targets import Contrast, PairLogit, Target
from .base import Attribution, Method, register
from .pairs import PairRuns


def _to_pairs(x: torch.Tensor, tower: str, B: int, P: int) -> torch.Tensor:
    """Per-row values (rows, ...) of a tower -> (B, P, ...)."""
    if tower == "image":
        return x[:, None].expand(B, P, *x.shape[1:])
    return x[None].expand(B, P, *x.shape[1:])


def _dot_pairs(t: torch.Tensor, w: torch.Tensor, tower: str) -> torch.Tensor:
    """<t[row, ..., :], w[b, p, :]>: (rows, K, C) x (B, P, C) -> (B, P, K)."""
    return torch.einsum("bkc,bpc->bpk" if tower == "image" else "pkc,bpc->bpk", t, w)


class FrozenReadout:
    """One tower's readout with its final norm frozen at the observed statistics: an affine map
    from the readout token's residual stream (C) to the embedding (D), and the split of its
    constant over the K terms of the stream (see the module docstring)."""

    def __init__(self, adapter: ModelAdapter, run: TowerRun):
        self.adapter, self.run, self.tower = adapter, run, run.tower
        parts = adapter.readout_parts(self.tower)
        rows = run.layout.readout.shape[0]
        z0 = run.block_outputs[-1]
        self.ar, self.r = torch.arange(rows, device=z0.device), run.layout.readout
        z = z0[self.ar, self.r]  # (rows, C)
        C = z.shape[-1]
        self.centre = parts.norm == "layernorm"
        if parts.norm == "layernorm":
            sigma = (z.var(-1, unbiased=False) + parts.eps).sqrt()
        elif parts.norm == "rmsnorm":
            sigma = (z.pow(2).mean(-1) + parts.eps).sqrt()
        elif parts.norm == "none":
            sigma = torch.ones_like(z[:, 0])
        else:
            raise InputError(f"decomposition does not know the final norm {parts.norm!r}")
        one = torch.ones(C, dtype=z.dtype, device=z.device)
        self.gamma = parts.norm_weight if parts.norm_weight is not None else one
        self.beta = parts.norm_bias if parts.norm_bias is not None else torch.zeros_like(one)
        self.Wp = (
            parts.proj_weight
            if parts.proj_weight is not None
            else torch.eye(C, dtype=z.dtype, device=z.device)
        )
        self.const_d = self.Wp @ self.beta + (parts.proj_bias if parts.proj_bias is not None else 0.0)  # (D,)
        self.sigma = sigma
        L = len(run.attentions)
        H = run.attentions[0].shape[1]
        self.n_valid = run.layout.valid.sum(1).to(z.dtype)  # (rows,)
        self.has_bias = [adapter.attention_out_bias(self.tower, l) is not None for l in range(L)]
        self.K = 1 + L * H * self.n_valid + sum(self.has_bias) + L  # (rows,)
        self.const_d_share = self.const_d[None] / self.K[:, None]  # (rows, D)

    def to_embedding(self, t: torch.Tensor, count: torch.Tensor | float = 1.0) -> torch.Tensor:
        """(rows, ..., C) terms -> (rows, ..., D) in embedding space, each carrying ``count``
        ((rows,) or a number) shares of the split constant."""
        c = t - t.mean(-1, keepdim=True) if self.centre else t
        lead = (slice(None),) + (None,) * (t.dim() - 2)
        sigma = self.sigma[lead + (None,)]
        share = self.const_d_share[lead[:1] + (None,) * (t.dim() - 2)]
        if isinstance(count, torch.Tensor):
            count = count[lead + (None,)]
        return (self.gamma * c / sigma) @ self.Wp.T + count * share


class TowerDecomposition(FrozenReadout):
    """The frozen readout of one tower and its terms' shares for every pair."""

    def __init__(
        self, adapter: ModelAdapter, run: TowerRun, u: torch.Tensor, scale: torch.Tensor, B: int, P: int
    ):
        super().__init__(adapter, run)
        self.B, self.P = B, P
        sigma = self.sigma
        norm_embed = run.embeds.norm(dim=-1)  # (rows,)
        # share(t) = coef * <t, w> + bias_share   for a C-space term t of a row
        self.coef = _to_pairs(scale / (sigma * norm_embed), self.tower, B, P)  # (B, P)
        w = self.gamma * (u @ self.Wp)  # (B, P, C)
        self.w = w - w.mean(-1, keepdim=True) if self.centre else w
        beta_u = u @ self.const_d  # (B, P)
        self.bias_share = (
            _to_pairs(scale / norm_embed, self.tower, B, P) * beta_u / _to_pairs(self.K, self.tower, B, P)
        )

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """(rows, C) one term per row -> (B, P) its share of the explained value."""
        return self.coef * _dot_pairs(t[:, None], self.w, self.tower)[..., 0] + self.bias_share

    def run_terms(self) -> dict[str, torch.Tensor]:
        adapter, run, tower = self.adapter, self.run, self.tower
        B, P = self.B, self.P
        ar, r = self.ar, self.r
        valid = _to_pairs(run.layout.valid.to(self.sigma.dtype), tower, B, P)[:, :, None]  # (B, P, 1, n)
        x0 = run.block_inputs[0][ar, r]
        z_sum = x0  # the terms' sum in stream space, for the embedding-space check
        out = {"embedding_term": self.share(x0)}
        heads, tokens, biases, mlps, head_sums = [], 0.0, [], [], []
        for l, (x, attn) in enumerate(zip(run.block_inputs, run.attentions)):
            V = adapter.attention_value_heads(tower, l, x)  # (rows, H, n, C)
            rows, H, n, C = V.shape
            a = query_rows(attn, r)  # (rows, H, n): the readout token's attention rows
            # token term (h, j) is a_hj V_hj; its share: coef * a_hj <V_hj, w> + the constant's share
            vw = _dot_pairs(V.reshape(rows, H * n, C), self.w, tower).reshape(B, P, H, n)
            tok = (
                self.coef[..., None, None] * _to_pairs(a, tower, B, P) * vw
                + self.bias_share[..., None, None] * valid
            )
            heads.append(tok.sum(-1))
            tokens = tokens + tok.sum(2)
            head_sum = (a.unsqueeze(-2) @ V).squeeze(-2)  # (rows, H, C): sum_j a_hj V_hj
            head_sums.append(head_sum)
            attn_out = head_sum.sum(1)
            b_o = adapter.attention_out_bias(tower, l)
            if b_o is not None:
                biases.append(self.share(b_o.expand_as(x0)))
                attn_out = attn_out + b_o
            else:
                biases.append(torch.zeros_like(self.coef))
            mid = x[ar, r] + attn_out
            mlp = adapter.mlp_output(tower, l, mid[:, None])[:, 0]
            mlps.append(self.share(mlp))
            z_sum = z_sum + attn_out + mlp
        out["head_terms"] = torch.stack(heads, 2)
        out["token_terms"] = tokens  # (B, P, n)
        out["attn_bias_terms"] = torch.stack(biases, 2)
        out["mlp_terms"] = torch.stack(mlps, 2)
        out["head_embeddings"] = self.to_embedding(torch.stack(head_sums, 1), self.n_valid)  # (rows, L, H, D)
        # the map to embedding space is linear: the sum of every term's e(t) is e(sum of terms)
        # carrying all K shares of the constant
        total_d = self.to_embedding(z_sum, self.K)
        out["norm_bias_share"] = self.bias_share * _to_pairs(self.K, tower, B, P)
        embeds = run.embeds
        delta = (total_d - embeds).norm(dim=-1) / embeds.norm(dim=-1)
        out["delta_embedding"] = _to_pairs(delta, tower, B, P)
        out["total"] = (
            out["embedding_term"]
            + out["head_terms"].sum((2, 3))
            + out["attn_bias_terms"].sum(2)
            + out["mlp_terms"].sum(2)
        )
        return out


class PooledDecomposition:
    """A tower that pools with an attention head (SigLIP's MAP head: one probe query, then a
    residual MLP, no projection after it), split at the head:

        embed = sum_h sum_j P_hj U_hj + b_O + MLP(a),   a = sum_h sum_j P_hj U_hj + b_O

    P the head's probabilities, U_hj head h's value of token j (read through the final norm)
    mapped by its slice of the output projection (``adapter.pool_value_heads``). The (h, j)
    terms are split per token; the output bias and the MLP (not linear) are one lumped term
    each. Nothing after the head: a term t's share of the logit is ``scale * <t, u> / |embed|``,
    and the shares sum to the logit exactly. The blocks before the head are not split (each
    token's value already mixes them through the final norm of that token)."""

    def __init__(
        self, adapter: ModelAdapter, run: TowerRun, u: torch.Tensor, scale: torch.Tensor, B: int, P: int
    ):
        self.adapter, self.run, self.tower, self.B, self.P = adapter, run, run.tower, B, P
        if run.pool_attention is None or run.pool_attention.shape[2] != 1:
            raise InputError("decomposition splits a pooling head with exactly one probe query")
        self.u = u
        self.coef = _to_pairs(scale / run.embeds.norm(dim=-1), self.tower, B, P)  # (B, P)

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """(rows, C) -> (B, P)."""
        return self.coef * _dot_pairs(t[:, None], self.u, self.tower)[..., 0]

    def run_terms(self) -> dict[str, torch.Tensor]:
        adapter, run, tower, B, P = self.adapter, self.run, self.tower, self.B, self.P
        U = adapter.pool_value_heads(tower, run.block_outputs[-1])  # (rows, H, n, C)
        rows, H, n, C = U.shape
        probs = run.pool_attention[:, :, 0]  # (rows, H, n)
        uw = _dot_pairs(U.reshape(rows, H * n, C), self.u, tower).reshape(B, P, H, n)
        tok = self.coef[..., None, None] * _to_pairs(probs, tower, B, P) * uw  # (B, P, H, n)
        attended = torch.einsum("rhn,rhnc->rc", probs, U)
        bias = adapter.pool_out_bias(tower)
        if bias is not None:
            attended = attended + bias
        mlp = adapter.pool_mlp_output(tower, attended)
        embeds = run.embeds
        delta = (attended + mlp - embeds).norm(dim=-1) / embeds.norm(dim=-1)
        out = {
            "token_terms": tok.sum(2),
            "pool_head_terms": tok.sum(3),  # (B, P, H)
            "pool_bias_term": self.share(bias.expand_as(mlp)) if bias is not None else torch.zeros_like(self.coef),
            "pool_mlp_term": self.share(mlp),
            "delta_embedding": _to_pairs(delta, tower, B, P),
        }
        out["total"] = out["token_terms"].sum(-1) + out["pool_bias_term"] + out["pool_mlp_term"]
        return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@register
class Decomposition(Method):
    name = "decomposition"
    summary = "exact additive decomposition of the logit over layers, heads and tokens (TextSpan-style, no gradient)"
    reference = "Gandelsman, Efros, Steinhardt. Interpreting CLIP's Image Representation via Text-Based Decomposition. ICLR 2024"
    needs_gradient = False
    kept_attention = True  # the readout token's attention rows alone (``query_rows``)
    requires = frozenset({"readout_token", "linear_split"})
    complete = True
    image_only_extras = frozenset({"head_embeddings"})

    def unsupported(self, adapter: ModelAdapter, towers: tuple[str, ...], opts) -> str | None:
        # a tower that pools with a head whose pieces are exposed is split at the head instead
        split_at_head = tuple(t for t in towers if "pool_split" in adapter.capabilities(t))
        rest = tuple(t for t in towers if t not in split_at_head)
        return super().unsupported(adapter, rest, opts) if rest else None

    @staticmethod
    def _tower_terms(adapter, run, u, scale, B, P) -> dict:
        cls = TowerDecomposition if run.layout.has_readout_token else PooledDecomposition
        return cls(adapter, run, u, scale, B, P).run_terms()

    def check_target(self, target: Target) -> None:
        if not isinstance(target, (Contrast, PairLogit)):
            raise InputError(
                f"decomposition explains the logit and contrasts of logits exactly; the target "
                f"{target.describe()!r} is not additive in the embedding (use target='logit' or 'contrast:OTHER')"
            )

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts
    ) -> Attribution:
        versus = int(target.versus) if isinstance(target, Contrast) else None
        B, P = runs.B, runs.P
        i_hat, t_hat = _unit(runs.image.embeds), _unit(runs.text.embeds)
        scale = runs.scores.scale
        bias_v = 0.0 if runs.scores.bias is None else runs.scores.bias
        y, logits = runs.y, runs.logits
        out = Attribution()
        with torch.no_grad():
            if "image" in towers:
                u = t_hat[None].expand(B, P, -1)
                const = torch.full_like(y, 1.0) * bias_v
                if versus is not None:
                    u = u - t_hat[versus]
                    const = const * 0.0
                terms = self._tower_terms(adapter, runs.image, u, scale, B, P)
                gh, gw = runs.image.layout.grid
                patches = runs.image.layout.patches
                out.image_maps = terms["token_terms"][:, :, patches].reshape(B, P, gh, gw)
                other = torch.ones(terms["token_terms"].shape[-1], dtype=torch.bool, device=y.device)
                other[patches] = False
                terms["other_tokens_term"] = terms["token_terms"][:, :, other].sum(-1)
                terms["dims"] = scale * i_hat[:, None] * u
                out.extras.update(self._finish(terms, const, y, logits, prefix=""))
            if "text" in towers:
                u = i_hat[:, None].expand(B, P, -1)
                const = torch.full_like(y, 1.0) * bias_v
                if versus is not None:
                    const = const - logits[:, versus : versus + 1]
                terms = self._tower_terms(adapter, runs.text, u, scale, B, P)
                tok = terms["token_terms"]
                out.token_scores = tok.masked_fill(~runs.text.layout.valid[None].expand_as(tok), float("nan"))
                terms.pop("head_embeddings", None)  # per prompt, not per image: not kept as an extra
                out.extras.update(self._finish(terms, const, y, logits, prefix="text_"))
        return out

    @staticmethod
    def _finish(terms: dict, const: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, prefix: str) -> dict:
        total = terms.pop("total")
        terms.pop("token_terms")
        denom = torch.maximum(y.abs(), logits.abs()).clamp_min(torch.finfo(y.dtype).tiny)
        terms["delta_similarity"] = (total + const - y).abs() / denom
        return {prefix + k: v for k, v in terms.items()}
