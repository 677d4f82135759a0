"""The transformers-only paths never import torchvision or open_clip.

open_clip (and with it torchvision) is an optional extra; next to the CPU torch wheel a
torchvision from the registry fails at import and then breaks ``from transformers import
CLIPModel`` in the same process. So importing cliplens, loading a transformers checkpoint
(CLIP or SigLIP) and explaining with it must leave both modules unimported. Checked in a fresh
interpreter, since this test session may have imported them already.

Where torchvision IS installed (the open_clip environment), transformers itself imports it on
``from transformers import CLIPModel``; there the check is that cliplens adds nothing to what
transformers alone imports.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

from conftest import clip_tokenizer, make_tiny_siglip

SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    def optional():
        return sorted(m for m in ("torchvision", "open_clip") if m in sys.modules)

    baseline = []
    if sys.argv[1] == "baseline":  # what transformers imports on its own in this environment
        from transformers import AutoTokenizer, CLIPModel, SiglipModel  # noqa: F401

        baseline = optional()
    import numpy as np
    import cliplens

    for path in sys.argv[2:]:
        adapter = cliplens.load_model(path)
        image = np.zeros((40, 48, 3), dtype=np.uint8)
        cliplens.explain(adapter, image, ["a cat"], method="chefer")
    print(json.dumps([baseline, optional()]))
    """
)


def test_transformers_paths_import_neither_torchvision_nor_open_clip(tiny_checkpoint, tmp_path):
    siglip = tmp_path / "tiny-siglip"
    make_tiny_siglip().save_pretrained(siglip)
    clip_tokenizer().save_pretrained(siglip)
    (siglip / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    for mode in ("fresh", "baseline"):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, mode, str(tiny_checkpoint), str(siglip)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        baseline, after = json.loads(done.stdout.strip().splitlines()[-1])
        assert "open_clip" not in after
        if mode == "baseline":
            assert after == baseline  # cliplens imports nothing transformers did not
        elif importlib.util.find_spec("torchvision") is None:
            assert after == []  # the transformers-only environment: nothing at all
