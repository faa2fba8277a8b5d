"""Frozen backbones: a registry of specs (data), weight resolution, and one encode API for all of them."""

from genedml.backbones.load import Backbone, load_backbone
from genedml.backbones.registry import BackboneSpec, get_spec, list_specs, register

__all__ = ["Backbone", "BackboneSpec", "get_spec", "list_specs", "load_backbone", "register"]
