"""Procedural worlds with ground truth for evaluating explanations."""

from cliplens.worlds import shapes
from cliplens.worlds.shapes import Scene, ShapeObject, make_scene, write_dataset

__all__ = ["shapes", "Scene", "ShapeObject", "make_scene", "write_dataset"]
