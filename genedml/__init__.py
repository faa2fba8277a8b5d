"""genedml: predict spatial gene expression from H&E with Gene-DML heads on cached foundation features."""

__version__ = "0.9.0"
