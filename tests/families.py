"""One tiny-model factory per family, built from configs (no network anywhere in the tests).

``ADAPTER_FACTORIES`` lists ``(family, factory)``; ``factory(seed=0, dtype=torch.float32)``
returns a ModelAdapter around a tiny random model of that family. The contract, golden and
oracle tests run every method on each; a new family appends its factory here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ASSET_TOKENIZER = Path(__file__).resolve().parent.parent / "src" / "cliplens" / "assets" / "shapes-clip"


def tiny_clip_config(image_size=32, patch_size=8, vision_layers=3, text_layers=2, width=32, heads=4):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            vocab_size=49408,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=16,
    )


def clip_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSET_TOKENIZER)


def make_tiny_clip(seed=0, dtype=torch.float32, **kw):
    """A random CLIPModel, with weights scaled up so attention is far from uniform."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
        model.logit_scale.fill_(np.log(10.0))
    return model.to(dtype)


def random_image(seed=0, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- adapter factories ---------------------------------------------------------------------------


def hf_clip_factory(seed=0, dtype=torch.float32):
    from cliplens.adapters import HFClipAdapter

    return HFClipAdapter(make_tiny_clip(seed=seed, dtype=dtype), clip_tokenizer(), name="tiny-hf-clip")


ADAPTER_FACTORIES = [("hf-clip", hf_clip_factory)]


# ---- more families (SigLIP, open_clip) ----------------------------------------------------------


def tiny_siglip_config(
    image_size=32, patch_size=8, vision_layers=3, text_layers=2, width=32, heads=4, context=16
):
    """A tiny SigLIP; its text side uses the CLIP tokenizer's ids (SigLIP's own is SentencePiece)."""
    from transformers import SiglipConfig

    return SiglipConfig(
        text_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            vocab_size=49408,
            max_position_embeddings=context,
            pad_token_id=49407,
            bos_token_id=49406,
            eos_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
    )


def make_tiny_siglip(seed=0, dtype=torch.float32, **kw):
    """A random SiglipModel, attention sharpened (blocks and pooling head), bias set."""
    from transformers import SiglipModel

    torch.manual_seed(seed)
    model = SiglipModel(tiny_siglip_config(**kw))
    width = model.config.vision_config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
        head = model.vision_model.head
        head.attention.in_proj_weight[: 2 * width].mul_(6.0)
        head.probe.normal_()
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-2.0)
    return model.to(dtype)


def tiny_open_clip_cfg(
    image_size=32, patch_size=8, vision_layers=3, text_layers=2, width=32, heads=4, context=16, **vision
):
    """(embed_dim, vision_cfg, text_cfg) of a tiny OpenAI-layout open_clip ViT CLIP."""
    vision_cfg = dict(
        layers=vision_layers,
        width=width,
        head_width=width // heads,
        mlp_ratio=2.0,
        patch_size=patch_size,
        image_size=image_size,
        **vision,
    )
    text_cfg = dict(
        context_length=context, vocab_size=49408, width=width, heads=heads, layers=text_layers, mlp_ratio=2.0
    )
    return 16, vision_cfg, text_cfg


def make_tiny_open_clip(seed=0, dtype=torch.float32, quick_gelu=True, text_cfg=None, **kw):
    """A random open_clip.CLIP built from a config dict (no download), attention sharpened."""
    import open_clip

    embed_dim, vision_cfg, default_text = tiny_open_clip_cfg(**kw)
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim, vision_cfg, {**default_text, **(text_cfg or {})}, quick_gelu=quick_gelu)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.in_proj_weight"):
                p[: 2 * p.shape[1]].mul_(6.0)
        for name, p in model.named_parameters():
            if "positional_embedding" in name or "class_embedding" in name:
                p.normal_(std=0.5)
        model.logit_scale.fill_(np.log(10.0))
    return model.to(dtype)


def hf_siglip_factory(seed=0, dtype=torch.float32):
    from cliplens.adapters import HFSiglipAdapter

    return HFSiglipAdapter(make_tiny_siglip(seed=seed, dtype=dtype), clip_tokenizer(), name="tiny-hf-siglip")


def open_clip_factory(seed=0, dtype=torch.float32):
    from cliplens.adapters.open_clip import OpenClipAdapter

    return OpenClipAdapter(make_tiny_open_clip(seed=seed, dtype=dtype), name="tiny-open-clip")


ADAPTER_FACTORIES.append(("hf-siglip", hf_siglip_factory))
# open_clip is an optional extra (it needs torchvision): its factory joins only where it is installed
if importlib.util.find_spec("open_clip") is not None:
    ADAPTER_FACTORIES.append(("open_clip", open_clip_factory))


def make_tiny_siglip2(seed=0, dtype=torch.float32, patch_size=8, num_patches=16, **kw):
    """A random Siglip2Model (NaFlex) with the tiny SigLIP's sizes, attention sharpened."""
    from transformers import Siglip2Config, Siglip2Model

    base = tiny_siglip_config(patch_size=patch_size, **kw)
    shared = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    vision = {k: v for k, v in base.vision_config.to_dict().items() if k in (*shared, "patch_size")}
    vision["num_patches"] = num_patches
    text_keys = (*shared, "vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id")
    text_keys += ("eos_token_id",)
    text = {k: v for k, v in base.text_config.to_dict().items() if k in text_keys}
    torch.manual_seed(seed)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    width = model.config.vision_config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
        model.vision_model.head.attention.in_proj_weight[: 2 * width].mul_(6.0)
        model.vision_model.head.probe.normal_()
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-2.0)
    return model.to(dtype)


def hf_siglip2_factory(seed=0, dtype=torch.float32):
    from cliplens.adapters import HFSiglip2Adapter

    model = make_tiny_siglip2(seed=seed, dtype=dtype)
    return HFSiglip2Adapter(model, clip_tokenizer(), name="tiny-hf-siglip2")


# NaFlex keeps each image's aspect ratio, so a batch of mixed shapes gives a list of maps
ADAPTER_FACTORIES.append(("hf-siglip2", hf_siglip2_factory))


# ---- fusion models (image and text scored together) ----------------------------------------------

#: a word-level vocabulary for the tiny fusion models' BERT tokenizers (every test prompt's words)
FUSION_WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a an and the of photo small big red green blue yellow "
    "circle square triangle star cross dog cat"
).split()


def word_tokenizer():
    """A BERT word-piece tokenizer over :data:`FUSION_WORDS` (built in memory, no files)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(FUSION_WORDS)})


def randomise_biases(model: torch.nn.Module, std: float = 0.5) -> None:
    """Every bias drawn at random: transformers initialises them to zero, which hides bugs (a
    zero bias makes some gradients exactly 0 or symmetric)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name and "layer_norm" not in name:
                p.normal_(std=std)


def make_tiny_blip(seed=0, dtype=torch.float32, image_size=32, patch_size=8):
    """A random BlipForImageTextRetrieval: ViT 2 blocks, text encoder 2 layers with cross-attention,
    attention sharpened (queries and keys scaled up), biases random."""
    from transformers import BlipConfig, BlipForImageTextRetrieval
    from transformers.utils import logging as hf_logging

    text = dict(
        vocab_size=len(FUSION_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        encoder_hidden_size=24,
        pad_token_id=0,
        bos_token_id=2,
        sep_token_id=3,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.05,  # BLIP's default (1e-10) makes every patch token alike
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = BlipConfig(text_config=text, vision_config=vision)
    finally:
        hf_logging.set_verbosity(verbosity)
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config)
    randomise_biases(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(8.0)
            elif name.endswith("qkv.weight"):
                p[: 2 * p.shape[1]].mul_(8.0)
    return model.to(dtype)


def hf_blip_factory(seed=0, dtype=torch.float32):
    from cliplens.adapters.hf_blip import HFBlipITMAdapter

    return HFBlipITMAdapter(make_tiny_blip(seed=seed, dtype=dtype), word_tokenizer(), name="tiny-hf-blip-itm")


#: fusion families: the contract, oracle and golden tests run them beside ADAPTER_FACTORIES
FUSION_FACTORIES = [("hf-blip-itm", hf_blip_factory)]


def make_tiny_vilt(seed=0, dtype=torch.float32, image_size=32, patch_size=8):
    """A random ViltForImageAndTextRetrieval: one joint stack of 2 layers, attention sharpened
    (queries and keys scaled up), biases random, and the image class token and position
    embeddings drawn at random (ViLT initialises both to zero, which makes every patch token's
    embedding blind to where it sits: the shuffled patch order would then change nothing)."""
    from transformers import ViltConfig, ViltForImageAndTextRetrieval

    config = ViltConfig(
        vocab_size=len(FUSION_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        image_size=image_size,
        patch_size=patch_size,
        max_image_length=-1,
        pad_token_id=0,
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    model = ViltForImageAndTextRetrieval(config)
    randomise_biases(model)
    with torch.no_grad():
        embeddings = model.vilt.embeddings
        embeddings.cls_token.normal_(std=0.5)
        embeddings.position_embeddings.normal_(std=0.5)
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(8.0)
        # a head that reads more than the tanh's linear part: the pairs' logits then differ
        model.vilt.pooler.dense.weight.mul_(4.0)
        model.rank_output.weight.normal_(std=1.0)
    return model.to(dtype)


def hf_vilt_factory(seed=0, dtype=torch.float32):
    from cliplens.adapters.hf_vilt import HFViltITMAdapter

    return HFViltITMAdapter(make_tiny_vilt(seed=seed, dtype=dtype), word_tokenizer(), name="tiny-hf-vilt-itm")


FUSION_FACTORIES.append(("hf-vilt-itm", hf_vilt_factory))


def make_tiny_blip2(
    seed=0,
    dtype=torch.float32,
    image_size=32,
    patch_size=8,
    cross_attention_frequency=1,
    image_token_index=None,
):
    """A random Blip2ForImageTextRetrieval: ViT 2 blocks, Q-Former 2 layers over 4 query tokens and
    the prompt (cross-attention in every ``cross_attention_frequency``-th layer), attention
    sharpened (queries and keys scaled up), biases random. The query tokens, the ViT's class token
    and its position embeddings are drawn at random: BLIP-2 initialises the query tokens to zero
    (every query token alike, so the average over them would hide a wrong row) and the ViT's
    embeddings with its initializer_range of 1e-10 (every patch token alike). The model builds no
    language model (its text_config, an OPT by default, stays a config)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    vision = dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.05,
    )
    qformer = dict(
        vocab_size=len(FUSION_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        cross_attention_frequency=cross_attention_frequency,
        use_qformer_text_input=True,  # the text tokens' own feed-forward path (the ITM head needs it)
        pad_token_id=0,
    )
    # a tiny OPT: Blip2Config wants a language-model config, the ITM head builds no such model
    text = dict(
        model_type="opt",
        vocab_size=8,
        hidden_size=8,
        ffn_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=8,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=4,
        image_text_hidden_size=16,
        image_token_index=image_token_index,
    )
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config)
    randomise_biases(model)
    with torch.no_grad():
        model.query_tokens.normal_(std=1.0)
        model.vision_model.embeddings.class_embedding.normal_(std=0.5)
        model.vision_model.embeddings.position_embedding.normal_(std=0.5)
        # what attention adds, and the values, large beside the residual stream: else the
        # Q-Former's outputs hardly depend on the image or the prompt
        louder = ("attention.output.dense.weight", "value.weight", "self_attn.projection.weight")
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(8.0)
            elif name.endswith("qkv.weight"):
                p[: 2 * p.shape[1]].mul_(8.0)
            elif name.endswith(louder):
                p.mul_(4.0)
        model.itm_head.weight.normal_(std=0.5)
        # the match logit 1 for a plain image and prompt: not deep in the sigmoid's tail, and
        # away from 0 (float32 rounding of the head's two logits is absolute, ~1e-6 here)
        training = model.training
        model.eval()
        ids = torch.tensor([[2, 5, 3]])  # [CLS] a [SEP]
        if image_token_index is not None:  # the processor's query placeholders, cut off by the model
            ids = torch.cat([torch.full((1, 4), image_token_index), ids], dim=1)
        pixels = torch.zeros(1, 3, image_size, image_size)
        mask = torch.ones_like(ids)
        itm = model(
            pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True
        ).logits_per_image
        model.itm_head.bias[1] -= itm[0, 1] - itm[0, 0] - 1.0
        model.train(training)
    return model.to(dtype)


def hf_blip2_factory(seed=0, dtype=torch.float32, **kw):
    from cliplens.adapters.hf_blip2 import HFBlip2ITMAdapter

    model = make_tiny_blip2(seed=seed, dtype=dtype, **kw)
    return HFBlip2ITMAdapter(model, word_tokenizer(), name="tiny-hf-blip2-itm")


FUSION_FACTORIES.append(("hf-blip2-itm", hf_blip2_factory))


def make_tiny_lxmert(seed=0, dtype=torch.float32, head="match", r_layers=1, feat_dim=16):
    """A random LXMERT (``LxmertForPreTraining``, or ``LxmertForQuestionAnswering`` for
    ``head="answer"``): 2 language layers, ``r_layers`` relationship layers, 2 cross-modality
    layers, width 32, 4 heads, region features of ``feat_dim``; attention sharpened (queries and
    keys scaled up), biases random, weights drawn wider than LXMERT's 0.02 and the heads scaled
    so that the pairs' logits differ. LXMERT reads region features: see :func:`random_regions`."""
    from transformers import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering

    config = LxmertConfig(
        vocab_size=len(FUSION_WORDS),
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        l_layers=2,
        r_layers=r_layers,
        x_layers=2,
        visual_feat_dim=feat_dim,
        num_qa_labels=7,
        num_object_labels=5,
        num_attr_labels=3,
        max_position_embeddings=16,
        pad_token_id=0,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = (LxmertForQuestionAnswering if head == "answer" else LxmertForPreTraining)(config)
    randomise_biases(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(4.0)
        model.lxmert.pooler.dense.weight.mul_(4.0)
        last = model.answer_head.logit_fc[-1] if head == "answer" else model.cls.seq_relationship
        last.weight.normal_(std=1.0)
    return model.to(dtype)


def hf_lxmert_factory(seed=0, dtype=torch.float32, head="match", r_layers=1):
    from cliplens.adapters.hf_lxmert import HFLxmertAdapter

    model = make_tiny_lxmert(seed=seed, dtype=dtype, head=head, r_layers=r_layers)
    return HFLxmertAdapter(model, word_tokenizer(), name=f"tiny-hf-lxmert-{head}")


def random_regions(seed=0, regions=4, size=(48, 40), feat_dim=16, with_image=True):
    """A :class:`cliplens.RegionImage` of random features and random boxes (pixels) inside a
    ``size`` image (the random image itself, or only its size)."""
    import cliplens

    rng = np.random.default_rng(seed)
    w, h = size
    x0, y0 = rng.uniform(0, w - 12, regions), rng.uniform(0, h - 12, regions)
    boxes = np.stack([x0, y0, x0 + rng.uniform(3, 12, regions), y0 + rng.uniform(3, 12, regions)], axis=1)
    features = rng.normal(size=(regions, feat_dim))
    if with_image:
        return cliplens.RegionImage(features, boxes, image=random_image(seed, size))
    return cliplens.RegionImage(features, boxes, size=size)


def make_tiny_bridgetower(seed=0, dtype=torch.float32, image_size=32, patch_size=8, cross_layers=2, unimodal_layers=2):
    """A random BridgeTowerForImageAndTextRetrieval: RoBERTa-style text encoder and CLIP-ViT of
    ``unimodal_layers`` unimodal layers each (2), ``cross_layers`` cross-modal layers (2: one link
    tower per stream; the last ``cross_layers`` unimodal layers feed them),
    width 32 with 4 heads (the ViT: width 128, whose nn.MultiheadAttention has width // 64 = 2
    heads), attention sharpened (queries and keys scaled up), biases random, and the pooler and
    ITM head scaled so that the pairs' logits differ."""
    from transformers import BridgeTowerConfig, BridgeTowerForImageAndTextRetrieval

    text = dict(
        vocab_size=len(FUSION_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=unimodal_layers,
        num_attention_heads=4,
        max_position_embeddings=20,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision = dict(hidden_size=128, num_hidden_layers=unimodal_layers, image_size=image_size, patch_size=patch_size)
    config = BridgeTowerConfig(
        text_config=text, vision_config=vision, hidden_size=32, num_hidden_layers=cross_layers, num_attention_heads=4
    )
    torch.manual_seed(seed)
    model = BridgeTowerForImageAndTextRetrieval(config)
    randomise_biases(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(8.0)
            elif name.endswith("attn.in_proj_weight"):
                p[: 2 * p.shape[1]].mul_(4.0)
        bt = model.bridgetower
        bt.vision_model.visual.embeddings.class_embedding.normal_(std=0.5)
        bt.vision_model.visual.embeddings.position_embedding.weight.normal_(std=0.5)
        bt.cross_modal_text_pooler.dense.weight.mul_(4.0)
        bt.cross_modal_image_pooler.dense.weight.mul_(4.0)
        model.itm_score.fc.weight.normal_(std=1.0)
    return model.to(dtype)


def hf_bridgetower_factory(seed=0, dtype=torch.float32, **kw):
    from cliplens.adapters.hf_bridgetower import HFBridgeTowerITMAdapter

    model = make_tiny_bridgetower(seed=seed, dtype=dtype, **kw)
    return HFBridgeTowerITMAdapter(model, word_tokenizer(), name="tiny-hf-bridgetower-itm")


FUSION_FACTORIES.append(("hf-bridgetower-itm", hf_bridgetower_factory))


# LXMERT is not in FUSION_FACTORIES: it reads region features (RegionImage), never the pictures the
# contract tests give every family; tests/test_fusion_lxmert.py covers its contract


DETR_LABELS = ["cat", "dog", "red car", "tree", "person"]


def make_tiny_detr(seed=0, dtype=torch.float32, num_queries=10, init_std=0.2, sharpen=2.0):
    """A random DetrForObjectDetection on transformers' own ResNet (no timm): two basic stages,
    stride 8; d_model 32, 2 encoder and 2 decoder layers, 4 heads, ``num_queries`` queries, 5
    named classes. Biases random (DETR's are zero-initialised: with a zero value bias the first
    decoder self-attention, over zero query states, gets an exactly zero gradient), weights drawn
    with std ``init_std`` (DETR's 0.02 makes the cross-attention's output vanish next to the
    biases: the logits would barely depend on the image), attention sharpened (query and key
    projections scaled by ``sharpen``), the query embeddings and the class head drawn at random."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        out_features=["stage2"],
    )
    config = DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=num_queries,
        id2label=dict(enumerate(DETR_LABELS)),
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=init_std,
    )
    torch.manual_seed(seed)
    model = DetrForObjectDetection(config)
    randomise_biases(model)
    with torch.no_grad():
        model.model.query_position_embeddings.weight.normal_(std=1.0)
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(sharpen)
        model.class_labels_classifier.weight.normal_(std=0.5)
    return model.eval().to(dtype)


def hf_detr_factory(seed=0, dtype=torch.float32, **kw):
    from cliplens.adapters.hf_detr import IMAGENET_MEAN, IMAGENET_STD, DetrPreprocess, HFDetrAdapter

    model = make_tiny_detr(seed=seed, dtype=dtype, **kw)
    # DETR's recipe (shorter side to 800, longer at most 1333) at a tiny scale: 48 and 80
    preprocess = DetrPreprocess(
        size=48, crop=(48, 48), mean=IMAGENET_MEAN, std=IMAGENET_STD, do_center_crop=False, max_size=80, size_divisor=8
    )
    return HFDetrAdapter(model, preprocess=preprocess, name="tiny-hf-detr")


# DETR is not in FUSION_FACTORIES: its prompts are class names, never free text


# ---- BLIP's image-text contrastive mode: a dual encoder from a BLIP ITM model --------------------


def make_tiny_blip_itc(seed=0, dtype=torch.float32):
    """:func:`make_tiny_blip` with weights that make its ITC embeddings depend on the input: BLIP
    initialises its linear weights at std 0.02, so the random biases (std 0.5) would dominate
    every projection and all prompts (and all images) would embed alike. Here every linear
    weight other than the sharpened queries and keys is redrawn at std 1/sqrt(fan_in), the
    token, class and position embeddings are drawn at std 1 / 0.5, and the two ITC projections'
    biases are shrunk."""
    model = make_tiny_blip(seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    sharpened = ("query.weight", "key.weight", "qkv.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2 and "embeddings" not in name and not name.endswith(sharpened):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[1] ** 0.5)
        model.text_encoder.embeddings.word_embeddings.weight.copy_(
            torch.randn(model.text_encoder.embeddings.word_embeddings.weight.shape, generator=gen, dtype=torch.float64)
        )
        vision = model.vision_model.embeddings
        vision.class_embedding.copy_(0.5 * torch.randn(vision.class_embedding.shape, generator=gen, dtype=torch.float64))
        vision.position_embedding.copy_(
            0.5 * torch.randn(vision.position_embedding.shape, generator=gen, dtype=torch.float64)
        )
        model.vision_proj.bias.mul_(0.1)
        model.text_proj.bias.mul_(0.1)
    return model.to(dtype)


def hf_blip_itc_factory(seed=0, dtype=torch.float32):
    from cliplens.adapters.hf_blip_itc import HFBlipITCAdapter

    return HFBlipITCAdapter(make_tiny_blip_itc(seed=seed, dtype=dtype), word_tokenizer(), name="tiny-hf-blip-itc")


# BLIP's ITC is a dual encoder: the contract, oracle and golden tests run it with CLIP and SigLIP
ADAPTER_FACTORIES.append(("hf-blip-itc", hf_blip_itc_factory))
