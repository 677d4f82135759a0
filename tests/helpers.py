"""Checks the tests share, written once: what a model looks like from outside (hooks, patches,
flags, modes, attention settings), so "explain left it as it found it" means one thing."""

from __future__ import annotations

import torch


def hook_count(model: torch.nn.Module) -> int:
    """Every hook on every module, forward and backward, plus instance-level forward patches."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
        n += int("forward" in m.__dict__)  # an instance-level forward patch
    return n


def _configs(model) -> list:
    cfg = getattr(model, "config", None)
    seen, stack, out = set(), [cfg], []
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        stack.extend(getattr(c, key, None) for key in (getattr(c, "sub_configs", {}) or {}))
    return out


def model_state(model: torch.nn.Module) -> dict:
    """Everything a call could leave changed on a model, short of its weights."""
    return {
        "attn": [c._attn_implementation for c in _configs(model)],
        "grad": [p.requires_grad for p in model.parameters()],
        "param_grads": [p.grad is None for p in model.parameters()],
        "train": [m.training for m in model.modules()],
        "hooks": hook_count(model),
        "patched": [name for name, m in model.named_modules() if "forward" in m.__dict__],
    }


def rel(a, b) -> float:
    """max |a - b| over max |b| (finite entries; NaN must sit at the same places)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    keep = ~np.isnan(b)
    return float(np.abs(a[keep] - b[keep]).max() / np.abs(b[keep]).max())


def assert_batch_equals_one_by_one(adapter, images, prompts, method: str, tol: float = 1e-10) -> None:
    """Every pair of one B x P call equals that pair explained alone (maps, token scores, logit)."""
    import pytest

    import cliplens

    e = cliplens.explain(adapter, images, prompts, method=method)
    for b, img in enumerate(images):
        for p, prompt in enumerate(prompts):
            one = cliplens.explain(adapter, [img], [prompt], method=method)
            T = one.token_scores.shape[-1]
            assert rel(e.image_maps[b, p], one.image_maps[0, 0]) < tol
            assert rel(e.token_scores[b, p, :T], one.token_scores[0, 0]) < tol
            assert e.logits[b, p] == pytest.approx(one.logits[0, 0], rel=100 * tol)


def exact_eager_attention(monkeypatch) -> None:
    """transformers' eager attention with its softmax in the inputs' dtype (it runs the softmax
    in float32), on CLIP, SigLIP and SigLIP 2: float64 runs on the eager path are then exact, as
    cliplens's own eager path for open_clip already is."""

    def eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scores = query @ key.transpose(-1, -2) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    from transformers.models.clip import modeling_clip
    from transformers.models.siglip import modeling_siglip
    from transformers.models.siglip2 import modeling_siglip2

    for module in (modeling_clip, modeling_siglip, modeling_siglip2):
        monkeypatch.setattr(module, "eager_attention_forward", eager)
