"""Temporary changes to one model instance for one call, undone together.

Everything an adapter changes on a model while a method runs goes through one
:class:`Capture`: forward hooks and pre-hooks, per-instance ``forward`` patches (attention
modules that hand over their per-head probabilities), the eager-attention switch of a
transformers model, and frozen eval (eval mode, parameters without gradients). Each change
records how to undo itself in the capture's one list; leaving the ``with`` block undoes them
all, last change first, also when the block raised. An undo that fails does not stop the
others; its exception is raised once all have run. Exceptions are never swallowed, and
classes are never patched: a ``forward`` patch is an attribute of that one module instance.

    with Capture() as capture:
        capture.freeze(model)
        capture.forward_hook(model.encoder, on_output)
        out = model(x)
    # hooks removed, modes and flags back as they were
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .kept import additive_mask, fused_attention_kept


class Capture:
    """One handle list of temporary changes to model instances, undone in reverse order on exit.

    A capture is used once: changes are added inside its ``with`` block (so a change that fails
    half-way is undone with the rest) and all of them are undone when the block is left.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def undo(self) -> None:
        """Undo every change, last first; every undo runs, the first failure is raised after."""
        failure: BaseException | None = None
        while self._undo:
            step = self._undo.pop()
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - re-raised below once the rest is undone
                failure = failure or exc
        if failure is not None:
            raise failure

    def on_exit(self, undo: Callable[[], None]) -> None:
        """Record a step that undoes a change made by the caller."""
        self._undo.append(undo)

    # ---- hooks -------------------------------------------------------------------------------
    def forward_hook(self, module: torch.nn.Module, hook: Callable, *, with_kwargs: bool = False) -> None:
        """``module.register_forward_hook(hook)`` until exit."""
        self.on_exit(module.register_forward_hook(hook, with_kwargs=with_kwargs).remove)

    def forward_pre_hook(self, module: torch.nn.Module, hook: Callable, *, with_kwargs: bool = False) -> None:
        """``module.register_forward_pre_hook(hook)`` until exit."""
        self.on_exit(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs).remove)

    # ---- per-instance patches -----------------------------------------------------------------
    def patch_forward(self, module: torch.nn.Module, forward: Callable) -> None:
        """Route calls of this one ``module`` through ``forward`` (an instance attribute that
        shadows the class method) until exit; a ``forward`` the instance already had comes back."""
        had = "forward" in module.__dict__
        previous = module.__dict__.get("forward")

        def restore() -> None:
            if had:
                module.forward = previous
            else:
                module.__dict__.pop("forward", None)

        self.on_exit(restore)
        module.forward = forward

    def mha_probabilities(
        self,
        modules: list[torch.nn.MultiheadAttention],
        sink: Callable[[int, torch.Tensor], None],
        kept: bool = False,
        stop: bool = False,
    ) -> None:
        """Route each listed ``nn.MultiheadAttention`` instance through
        :func:`mha_with_probabilities` and hand its per-head probabilities (``kept``: its
        :class:`~cliplens.adapters.kept.KeptAttention`) to ``sink(i, probs)`` (i: the module's
        position in ``modules``; ``stop``: the ``"readout"`` path, which raises
        :class:`~cliplens.adapters.kept.ReadoutStop` instead). The fused kernels return no
        per-head probabilities (or only their mean, not in the graph), hence the swap."""
        for i, mha in enumerate(modules):

            def forward(
                query,
                key,
                value,
                key_padding_mask=None,
                need_weights=True,
                attn_mask=None,
                average_attn_weights=True,
                is_causal=False,
                _i=i,
                _mha=mha,
            ):
                out, probs = mha_with_probabilities(
                    _mha,
                    query,
                    key,
                    value,
                    attn_mask=attn_mask,
                    key_padding_mask=key_padding_mask,
                    is_causal=is_causal,
                    kept=kept,
                    stop=stop,
                )
                sink(_i, probs)
                if not need_weights:
                    return out, None
                return out, probs.mean(dim=1) if average_attn_weights else probs

            self.patch_forward(mha, forward)

    # ---- modes and switches -------------------------------------------------------------------
    def freeze(self, model: torch.nn.Module) -> None:
        """Eval mode and no parameter gradients until exit; every module's mode and every
        parameter's ``requires_grad`` come back exactly as they were."""
        modes = [(m, m.training) for m in model.modules()]
        flags = [(p, p.requires_grad) for p in model.parameters()]

        def restore() -> None:
            for m, mode in modes:
                m.training = mode
            for p, flag in flags:
                p.requires_grad_(flag)

        self.on_exit(restore)
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)

    def eager_attention(self, model: Any) -> None:
        """Switch a transformers model to eager attention (the path that returns probabilities)
        until exit; every (sub-)config's own setting comes back."""
        configs = all_configs(model.config)
        saved = [(cfg, cfg.__dict__.get("_attn_implementation_internal")) for cfg in configs]

        def restore() -> None:
            for cfg, value in saved:
                cfg._attn_implementation_internal = value

        self.on_exit(restore)
        if any(cfg._attn_implementation != "eager" for cfg in configs):
            model.set_attn_implementation("eager")


def all_configs(config: Any) -> list:
    """A transformers config and every nested sub-config (each holds its own attention setting)."""
    seen, stack, out = set(), [config], []
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return out


# ---- the single-change context managers of before, as thin wrappers ----------------------------


@contextlib.contextmanager
def frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """:meth:`Capture.freeze` for a ``with`` block."""
    with Capture() as capture:
        capture.freeze(model)
        yield


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """:meth:`Capture.eager_attention` for a ``with`` block."""
    with Capture() as capture:
        capture.eager_attention(model)
        yield


@contextlib.contextmanager
def mha_probabilities(
    modules: list[torch.nn.MultiheadAttention], sink: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """:meth:`Capture.mha_probabilities` for a ``with`` block."""
    with Capture() as capture:
        capture.mha_probabilities(modules, sink)
        yield


@contextlib.contextmanager
def module_hooks(registrations: list[Callable[[], torch.utils.hooks.RemovableHandle]]) -> Iterator[None]:
    """Register hooks (each a call returning its handle) for a ``with`` block; always removed."""
    with Capture() as capture:
        for register in registrations:
            capture.on_exit(register().remove)
        yield


# ---- nn.MultiheadAttention with per-head probabilities ------------------------------------------


def mha_with_probabilities(
    mha: torch.nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    kept: bool = False,
    stop: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``mha(query, key, value, ...)[0]`` computes, from the module's own weights, one head
    at a time, returning ``(output, probabilities)``; probabilities are (B, H, Lq, Lk) and the
    output is computed from exactly that tensor, so gradients reach it. Inputs follow the
    module's ``batch_first`` layout (or are unbatched (L, E)). ``kept``: the heads run on the
    fused kernel and a :class:`~cliplens.adapters.kept.KeptAttention` stands for the
    probabilities (``stop`` with ``kept``: raised in a :class:`~cliplens.adapters.kept.ReadoutStop`
    once the heads' queries, keys and values are computed)."""
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise NotImplementedError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, Lq, E = query.shape
    Lk = key.shape[1]
    H = mha.num_heads
    d = E // H
    bias = mha.in_proj_bias
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    q = F.linear(query, w_q, b_q).reshape(B, Lq, H, d).transpose(1, 2)
    k = F.linear(key, w_k, b_k).reshape(B, Lk, H, d).transpose(1, 2)
    v = F.linear(value, w_v, b_v).reshape(B, Lk, H, d).transpose(1, 2)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1)
    masks = []
    for mask in (attn_mask, key_padding_mask):
        if mask is None:
            continue
        if mask is key_padding_mask:
            mask = mask[:, None, None, :]
        elif mask.dim() == 3:
            mask = mask.reshape(B, H, Lq, Lk)
        masks.append(mask)
    if kept:
        additive = [additive_mask(m, q.dtype) for m in masks]
        mask = sum(additive[1:], additive[0]) if additive else None
        mixed, probs = fused_attention_kept(q, k, v, mask, d**-0.5, stop=stop)
    else:
        scores = (q * d**-0.5) @ k.transpose(-1, -2)  # (B, H, Lq, Lk)
        for mask in masks:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask, float("-inf"))
            else:
                scores = scores + mask.to(scores.dtype)
        probs = scores.softmax(dim=-1)
        mixed = F.dropout(probs, mha.dropout, mha.training) @ v
    out = mha.out_proj(mixed.transpose(1, 2).reshape(B, Lq, E))
    if unbatched:
        out = out.squeeze(0)
    elif not mha.batch_first:
        out = out.transpose(0, 1)
    return out, probs
