"""Moved to :mod:`cliplens.methods.pairs`; these names stay importable from here."""

from .methods.pairs import PairRuns, PairsForward, forward_pairs, per_pair

__all__ = ["PairRuns", "PairsForward", "forward_pairs", "per_pair"]
