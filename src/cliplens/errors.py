"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""

import re


class CliplensError(Exception):
    """Base class of every error that is the user's input rather than a bug."""

    exit_code = 2


class ImageError(CliplensError):
    """An image file that cannot be read: missing, corrupt, truncated, too large, not an image."""


class ModelLoadError(CliplensError):
    """A model that cannot be loaded: not a CLIP checkpoint, not cached and no network, unknown name."""


class InputError(CliplensError):
    """Bad arguments: no prompts, empty prompts, unknown method or target, shapes that do not fit."""


class DatasetError(CliplensError):
    """A dataset that cannot be read: unknown kind, missing or corrupt file, bad annotation.

    The message is kept on one line (line breaks in a reader's message become spaces)."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())
