"""Model-randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

Cascading randomisation: starting from the top block of the image tower and going down, the
blocks' weights are replaced by random values one block at a time; at each depth d (the top
d blocks random) every method explains the same inputs again, and the Spearman rank
correlation between the new map and the map of the trained model is recorded. A method
that explains the model must lose that correlation as the weights it explains disappear;
a map that survives randomisation (correlation near 1) reflects the input or the method,
not the model.

Randomisation is done on a deep copy of the model; the original is never touched. Each
parameter tensor of a randomised block is redrawn from a Gaussian with that tensor's own
mean and standard deviation (a constant tensor keeps its value), from a generator seeded
by ``(seed, block, parameter name)``: the same random weights for every image of a run,
and activations of the usual scale. The text tower, the embeddings, the final norm and the
projection stay trained.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator

import torch

from ..adapters import ModelAdapter
from ..errors import InputError

__all__ = ["CascadingRandomization", "image_blocks"]


def image_blocks(adapter: ModelAdapter) -> list[torch.nn.Module]:
    """The image tower's blocks, first to last (the adapter contract's ``blocks``)."""
    return list(adapter.blocks("image"))


def _seed_for(seed: int, block: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{block}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class CascadingRandomization:
    """A private copy of ``adapter`` whose image blocks can be randomised from the top down.

    Use :meth:`depths` as an iterator of ``(d, randomised_adapter)`` for d = 1 .. L; the copy
    is restored to the trained weights when the iteration ends (also on errors), so one
    instance serves every image of a run.
    """

    def __init__(self, adapter: ModelAdapter, seed: int = 0):
        self.seed = int(seed)
        self.adapter = adapter.with_model(copy.deepcopy(adapter.model))
        self.blocks = image_blocks(self.adapter)
        if not self.blocks:
            raise InputError("the model's image tower has no blocks to randomise")
        self._trained = [{k: v.detach().clone() for k, v in b.state_dict().items()} for b in self.blocks]
        self._random: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _random_state(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._random:
            state = {}
            for name, p in self.blocks[index].named_parameters():
                data = p.detach()
                flat = data.double().flatten()
                mean = float(flat.mean())
                std = float(flat.std()) if flat.numel() > 1 else 0.0
                if std > 0:
                    g = torch.Generator().manual_seed(_seed_for(self.seed, index, name))
                    new = mean + std * torch.randn(data.shape, generator=g, dtype=torch.float64)
                else:
                    new = data.double().clone()
                state[name] = new.to(device=data.device, dtype=data.dtype)
            self._random[index] = state
        return self._random[index]

    def _set(self, index: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.blocks[index].named_parameters():
                if name in state:
                    p.copy_(state[name])

    def restore(self) -> None:
        for i, state in enumerate(self._trained):
            self.blocks[i].load_state_dict(state)

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.restore()

    def depths(self) -> Iterator[tuple[int, ModelAdapter]]:
        """Yield (d, adapter with the top d image blocks random) for d = 1 .. L."""
        with self._restoring():
            L = self.num_blocks
            for d in range(1, L + 1):
                self._set(L - d, self._random_state(L - d))
                yield d, self.adapter
