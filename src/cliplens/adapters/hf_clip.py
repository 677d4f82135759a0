"""Hugging Face transformers ``CLIPModel``: what CLIP adds to the shared encoder layout
(:class:`~cliplens.adapters.hf_encoder.HFEncoderAdapter`).

Module paths used beyond the shared ones: ``vision_model.{pre_layrnorm, post_layernorm}``,
``visual_projection``, ``text_model.final_layer_norm``, ``text_projection``, ``logit_scale``.
The image tower reads out its class token, the text tower the end-of-text token (as
``CLIPTextModel`` picks it); both then go through the final norm and the projection.
"""

from __future__ import annotations

import torch

from ..preprocess import (  # noqa: F401 (the recipe's old import path)
    OPENAI_MEAN,
    OPENAI_STD,
    Preprocess,
    preprocess_from_config,
)
from .base import FanOut, TextBatch, TokenLayout, TowerRun, forward_or_readout
from .capture import Capture, all_configs, eager_attention  # noqa: F401 (old import path)
from .hf_encoder import HFEncoderAdapter
from .hub import read_processor_config  # noqa: F401 (old import path)
from .kept import EVERY_BLOCK, AttentionReads

#: config.json model_type values this file's adapter takes
HF_CLIP_TYPES = {"clip"}

#: the old name of :func:`~cliplens.adapters.capture.all_configs`
_all_configs = all_configs


class HFClipAdapter(HFEncoderAdapter):
    family = "hf-clip"
    pair_probability = "softmax"
    model_class = "CLIPModel"
    label = "CLIP"

    @staticmethod
    def _preprocess_from(processor_config: dict | None, vision_config) -> Preprocess:
        return preprocess_from_config(processor_config, vision_config.image_size)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    # ---- inputs ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TextBatch:
        tok = self.tokenizer
        limit = self.context_length
        full = tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        kept = tok(list(texts), add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
        eos = self._eos_id()
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        width = max(len(ids) for ids in kept)
        input_ids = torch.full((len(texts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        tokens = []
        for i, ids in enumerate(kept):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            tokens.append(self._token_strings(ids))
        truncated = [len(f) > len(k) for f, k in zip(full, kept)]
        content = self._text_content(input_ids, self._readout_positions(input_ids))
        return TextBatch(list(texts), input_ids.to(self.device), mask.to(self.device), tokens, truncated, content)

    def _eos_id(self) -> int:
        eos = self.model.config.text_config.eos_token_id
        if eos == 2 or eos is None:  # legacy configs: the end token is the largest id
            return int(self.tokenizer.eos_token_id)
        return int(eos)

    def _readout_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token the text tower pools, exactly as CLIPTextModel chooses it."""
        if self.model.config.text_config.eos_token_id == 2:
            return input_ids.to(torch.int).argmax(dim=-1).long()
        return (input_ids == self.model.config.text_config.eos_token_id).int().argmax(dim=-1).long()

    @staticmethod
    def _text_content(input_ids: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        """(P, T) bool: the tokens between the start token and the end token."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return (positions > 0) & (positions < readout[:, None])

    # ---- running -----------------------------------------------------------------------
    def run_image(
        self,
        pixel_values: torch.Tensor,
        *,
        detach_blocks: bool = False,
        input_embeds: torch.Tensor | None = None,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        vm = self.model.vision_model
        layout = self._image_layout(pixel_values, class_token=True, pooled=False)
        if fan_out is not None:
            layout = fan_out.layout(layout)
        run = TowerRun("image", embeds=None, layout=layout, pixel_values=pixel_values)  # type: ignore[arg-type]

        def forward():
            with Capture() as capture:
                self._capture(capture, vm, run, detach_blocks, input_embeds, fan_out, reads)
                return vm(pixel_values=pixel_values, interpolate_pos_encoding=True)

        out = forward_or_readout(self, run, forward)
        if out is not None:
            run.pooled = out.pooler_output
            run.embeds = self.model.visual_projection(run.pooled)
        return run

    def run_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        detach_blocks: bool = False,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        tm = self.model.text_model
        readout = self._readout_positions(input_ids)
        layout = TokenLayout(
            readout=readout, content=self._text_content(input_ids, readout), valid=attention_mask.bool()
        )
        if fan_out is not None:
            layout = fan_out.layout(layout)
        run = TowerRun("text", embeds=None, layout=layout)  # type: ignore[arg-type]

        def pooled() -> torch.Tensor:
            with Capture() as capture:
                self._capture(capture, tm, run, detach_blocks, fan_out=fan_out, reads=reads)
                if fan_out is None:
                    return tm(input_ids=input_ids, attention_mask=attention_mask).pooler_output
                # the model pools by its input ids, which a fan-out does not repeat: the forward
                # stops after the final norm and the rows are pooled here
                forward = lambda: tm(input_ids=input_ids, attention_mask=attention_mask)  # noqa: E731
                hidden = _until(capture, tm.final_layer_norm, forward)
                return hidden[torch.arange(hidden.shape[0], device=hidden.device), layout.readout]

        run.pooled = forward_or_readout(self, run, pooled)
        if run.pooled is not None:
            run.embeds = self.model.text_projection(run.pooled)
        return run

    def _head_modules(self, tower: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        if tower == "image":
            return self.model.vision_model.post_layernorm, self.model.visual_projection
        return self.model.text_model.final_layer_norm, self.model.text_projection


class _Reached(Exception):
    """Carries a module's output out of a forward that need not go on (see :func:`_until`)."""

    def __init__(self, output: torch.Tensor):
        super().__init__("forward stopped")
        self.output = output


def _until(capture: Capture, module: torch.nn.Module, forward) -> torch.Tensor:
    """Run ``forward()`` up to ``module`` and return that module's output; the rest of the
    forward is not run (a hook in ``capture`` raises :class:`_Reached`, caught here only)."""

    def stop(mod, args, output):
        raise _Reached(output)

    capture.forward_hook(module, stop)
    try:
        forward()
    except _Reached as reached:
        return reached.output
    raise RuntimeError(f"the forward never reached {type(module).__name__}")
