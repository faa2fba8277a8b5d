"""Feature cache: zarr v3 store with atomic per-sample groups, provenance checks, and h5 export."""

from genedml.cache.export import export_h5
from genedml.cache.store import CachedSample, FeatureCache, settings_diff

__all__ = ["CachedSample", "FeatureCache", "export_h5", "settings_diff"]
