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
