"""The core install never imports the web app's framework.

``cliplens app`` needs the optional extra ``app`` (starlette, uvicorn, python-multipart);
importing cliplens, building the command line and explaining must leave those modules
unimported, so the core works where they are not installed. Checked in a fresh interpreter,
since this test session may have imported them already (the app tests do).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

WEB = ("starlette", "uvicorn", "multipart", "python_multipart", "fastapi", "gradio")

SCRIPT = textwrap.dedent(
    f"""
    import json
    import sys

    import numpy as np
    import cliplens
    from cliplens.cli import build_parser
    from cliplens.viz import pages

    build_parser().parse_args(["app", "--port", "9"])  # the subcommand is declared, nothing imported
    adapter = cliplens.load_model("shapes")
    image = np.zeros((40, 48, 3), dtype=np.uint8)
    for method in ("chefer", "interactions"):
        cliplens.explain(adapter, image, ["a red circle", "a blue square"], method=method)
    print(json.dumps(sorted(m for m in {WEB!r} if m in sys.modules)))
    """
)


def test_core_never_imports_the_web_framework():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_app_command_without_the_extra_says_how_to_install():
    """Where the extra is missing, ``cliplens app`` stops with one line naming the extra. In a
    fresh interpreter: in this session the app's modules may be imported already, and a module
    found in ``sys.modules`` would be served instead of failing."""
    block = (
        "import sys; sys.modules['starlette'] = None; from cliplens.cli import main; sys.exit(main(['app']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", block], check=False, capture_output=True, text=True, timeout=120
    )
    err = done.stderr.strip()
    assert done.returncode == 2, err[-2000:]
    assert err.startswith("cliplens: error:") and "cliplens[app]" in err and "\n" not in err
