"""cliplens: why does a CLIP-family model match this image with this text?"""

__version__ = "0.1.0"

from .adapters import load_model  # noqa: E402
from .api import explain, similarity  # noqa: E402
from .errors import CliplensError, ImageError, InputError, ModelLoadError  # noqa: E402
from .explanation import Explanation  # noqa: E402
from .methods import list_methods  # noqa: E402
from .targets import Contrast, PairLogit, PromptProbability, Target  # noqa: E402

__all__ = [
    "__version__",
    "explain",
    "similarity",
    "load_model",
    "list_methods",
    "Explanation",
    "Target",
    "PairLogit",
    "PromptProbability",
    "Contrast",
    "CliplensError",
    "ImageError",
    "InputError",
    "ModelLoadError",
]
