"""Published evaluation protocols as one call each, on features from a genedml cache.

`hest`: the HEST-Benchmark protocol on HEST's benchmark folder (its splits, genes, log1p targets, ridge probe
and metric), for every genedml head on the same folds. `paper`: the Gene-DML / TRIPLEX patient folds,
targets and per-slide PCC (ACG/HEG/HVG/HPG) on her2st, STNet and cSCC.
"""
