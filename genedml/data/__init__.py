"""Inputs: the `Sample` contract, lazy image readers and one reader per input format."""

from genedml.data.anndata_reader import read_anndata
from genedml.data.authors_layout import read_authors_layout
from genedml.data.hest import read_hest
from genedml.data.formats import open_image
from genedml.data.image import ArrayImage, PillowImage, Region, RegionReader
from genedml.data.legacy_st import read_legacy_st
from genedml.data.openslide_image import OpenSlideImage
from genedml.data.read import READERS, detect_format, inspect_samples, read_samples
from genedml.data.reader import Reader, ReadOptions
from genedml.data.sample import Sample
from genedml.data.samples_table import SampleInfo, read_samples_table
from genedml.data.spaceranger import read_spaceranger
from genedml.data.spatialdata_reader import read_spatialdata
from genedml.data.visium_hd import read_visium_hd
from genedml.data.tiff import TiffImage

__all__ = [
    "READERS",
    "ReadOptions",
    "Reader",
    "ArrayImage",
    "OpenSlideImage",
    "PillowImage",
    "Region",
    "RegionReader",
    "Sample",
    "SampleInfo",
    "TiffImage",
    "detect_format",
    "inspect_samples",
    "open_image",
    "read_anndata",
    "read_authors_layout",
    "read_hest",
    "read_legacy_st",
    "read_samples",
    "read_samples_table",
    "read_spaceranger",
    "read_spatialdata",
    "read_visium_hd",
]
