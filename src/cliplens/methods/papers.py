"""What each method was compared with: the paper, the reference repository, what was compared
and how close (``cliplens methods`` prints it; docs/methods.md says the same per method).

One note per registered method (a test checks none is missing). "Checked against a float64
oracle" means the equation as written in design/ALGORITHMS.md, implemented independently
(tests/oracles.py), not the reference repository's code.
"""

from __future__ import annotations

PAPERS: dict[str, str] = {
    "chefer": (
        "Chefer, Gur, Wolf, ICCV 2021; reference hila-chefer/Transformer-MM-Explainability (CLIP notebook "
        "`interpret`). Compared: the equation, against a float64 oracle with full n x n matrices (1e-6 of "
        "the map's scale, every family); not run against the notebook's code. Default start_layer = the "
        "last block, as the notebook for ViT-B/16. Fusion models: the bi-modal and encoder-decoder rules of the same paper (reference: its LXMERT, VisualBERT and DETR generators, read, not run), against float64 oracles written from the equations on BLIP, BLIP-2, ViLT, LXMERT and DETR (1e-6); the reference's 0/0 is selectable (degenerate_rows=reference)."
    ),
    "legrad": (
        "Bousselham et al. 2024; reference WalBouss/LeGrad (PyPI legrad-torch, LeWrapper). Compared: "
        "layers=2, pooling='mean' against legrad-torch 1.1 (open_clip 2.23) on the same ViT-B/16 weights: "
        "equal to 2.5e-6 relative. Defaults are the wrapper's; the SigLIP empty-prompt correction follows "
        "its code (not run against it); float64 oracle on every family."
    ),
    "grad_eclip": (
        "Zhao et al., ICML 2024; reference Cyang-Zhao/Grad-Eclip (no licence: read, not run). Compared: "
        "the paper's per-head equation against a float64 oracle (every family); differs from the "
        "reference code, which recomputes the last block as one head."
    ),
    "rollout": (
        "Abnar & Zuidema, ACL 2020; reference samiraabnar/attention_flow. Compared: float64 oracle with "
        "full matrices, closed forms for uniform and identity attention; not run against the reference code."
    ),
    "raw_attention": (
        "Raw-attention baseline (Abnar & Zuidema 2020 and later work); no reference code. Compared: "
        "float64 oracle on every family."
    ),
    "gradcam": (
        "Selvaraju et al., ICCV 2017; ViT recipe of jacobgil/pytorch-grad-cam. Compared: float64 oracle; "
        "features differ from the recipe (the residual stream entering the block, not its first norm's "
        "output): not numerically comparable with it. Fusion models: LAVIS's cross-attention Grad-CAM (salesforce/LAVIS compute_gradcam, read, not run), against its formula per word (float64); explains the ITM log-odds where LAVIS uses itm[:, 1]."
    ),
    "sensitivity": (
        "Simonyan et al. 2014, gradient x input (Shrikumar et al. 2016), the seed blog's deoptimization; "
        "no reference code. Compared: float64 oracle (grad_norm, grad_x_input); the pixel gradient is "
        "rebuilt from the patch convolution's weights in a test."
    ),
    "decomposition": (
        "Gandelsman, Efros, Steinhardt, ICLR 2024 (TextSpan); reference yossigandelsman/clip_text_span "
        "(prs_hook.py). Compared: completeness (the parts sum to the logit, float64 < 1e-10) and a float64 "
        "loop oracle; not run against prs_hook.py, whose bias split differs (see docs)."
    ),
    "interactions": (
        "From the TextSpan-style decomposition (exact, no gradient); exCLIP (Moeller et al., TMLR 2025) is "
        "the gradient reference. Compared: float64 loop oracle and completeness (1e-9); not against exCLIP's code."
    ),
    "jacobian_interactions": (
        "exCLIP (Moeller et al., TMLR 2025): the plain Jacobian product (their integrated path not used). "
        "Compared: float64 oracle, one backward per embedding dimension; not against exCLIP's code."
    ),
}


def paper_note(name: str) -> str:
    """The note of method ``name`` ("" where none is written)."""
    return PAPERS.get(name, "")
