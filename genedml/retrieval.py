"""Retrieval prediction: a FAISS index over reference spots' gene embeddings, queried with image embeddings.

A spot's prediction is a weighted mean of the expression of its k most similar reference spots (cosine
similarity = inner product of L2-normalised vectors), optionally blended with a regression head's output.
Weightings, by name: ``uniform`` (BLEEP, k = 50; k = 1 gives BLEEP's top-1 copy), ``softmax`` over
similarity / tau, and ``inverse-l1`` (mclSTExp, k = 200: weights proportional to 1 / L1 distance squared).
BLEEP's distance-weighted mean exp(-(|key_j - q|^2 - |key_1 - q|^2 + 1)) is ``softmax`` with tau = 0.5 on
unit vectors (|a - b|^2 = 2 - 2 a.b, and the constant cancels after normalisation).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file

from genedml.log import log
from genedml.model_dir import INDEX_FILE
from genedml.errors import GenedmlError, InputError, ModelDirError


Weighting = Literal["uniform", "softmax", "inverse-l1"]
WEIGHTINGS: tuple[str, ...] = ("uniform", "softmax", "inverse-l1")
BANK_TENSORS = "bank.safetensors"
BANK_META = "bank.json"
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "ivfpq")
IndexKind = Literal["flat", "ivf", "ivfpq"]
_INDEX_FORMAT = "genedml.retrieval_index"
_POINTS_PER_LIST = 39  # fewer training points per k-means centroid makes faiss warn and degrade
_TRAIN_POINTS_PER_LIST = 64  # k-means trains on at most this many points per centroid (bounds build time)
_MAX_NLIST = 65536
_PQ_NBITS = 8  # 256 centroids per sub-quantiser: one byte per sub-vector
_MAX_PQ_M = 64
RERANK_FACTOR = 4  # an ivfpq search shortlists this many x k candidates, re-ranked exactly from the bank
_BANK_FORMAT = "genedml.reference_bank"
_L1_EPS = 1e-6  # guards 1 / d^2 when a query coincides with a neighbour (then that neighbour dominates)
_GPU_MAX_K = 2048  # faiss GPU k-selection limit
_CHUNK_BYTES = 64 << 20  # bound on temporaries (query chunk x k x E) in the inverse-l1 distances


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm, as a float32 C-contiguous copy (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return x


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """`x` as float32 with unit rows; rows already unit are kept bit for bit (a saved bank reloads equal)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    if np.all((np.abs(norms - 1.0) < 1e-5) | (norms == 0.0)):
        return x
    return l2_normalise(x)


def _check_matrix(name: str, x: np.ndarray, dim: int | None = None) -> None:
    """Raise InputError when `x` is not a finite 2-D matrix (with `dim` columns, when given)."""
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D (rows, dim) array, got shape {x.shape}.")
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"{name} has {x.shape[1]} columns but the index/bank expects {dim}: "
                         "were the embeddings made by another model?")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise InputError(f"{name} has non-finite values (NaN/inf) in {bad.size} rows, "
                         f"first rows {bad[:5].tolist()}.")


# --------------------------------------------------------------------------------------------- bank


@dataclass
class ReferenceBank:
    """The reference spots that retrieval copies expression from.

    embeddings: (M, E) float32, L2-normalised gene embeddings (normalised here if they are not).
    expression: (M, G) float32, normalised targets (the same normalisation the model predicts).
    sample_ids: (M,) str, the slide of each reference spot.  barcodes: (M,) str.
    genes:      optional gene panel (G names), kept so a loaded bank can be checked against a model.
    """

    embeddings: np.ndarray
    expression: np.ndarray
    sample_ids: np.ndarray
    barcodes: np.ndarray
    genes: list[str] | None = None

    def __post_init__(self) -> None:
        _check_matrix("bank embeddings", np.asarray(self.embeddings))
        self.embeddings = _unit_rows(self.embeddings)
        self.expression = np.ascontiguousarray(self.expression, dtype=np.float32)
        self.sample_ids = np.asarray(self.sample_ids).astype(str)
        self.barcodes = np.asarray(self.barcodes).astype(str)
        m = len(self.embeddings)
        sizes = {"expression": len(self.expression), "sample_ids": len(self.sample_ids),
                 "barcodes": len(self.barcodes)}
        wrong = {k: v for k, v in sizes.items() if v != m}
        if wrong:
            raise InputError(f"reference bank has {m} embeddings but row counts {wrong}.")
        if self.expression.ndim != 2:
            raise InputError(f"bank expression must be (spots, genes), got shape {self.expression.shape}.")
        if self.genes is not None and len(self.genes) != self.expression.shape[1]:
            raise InputError(f"bank has {self.expression.shape[1]} expression columns but "
                             f"{len(self.genes)} gene names.")

    def __len__(self) -> int:
        return len(self.embeddings)

    def save(self, directory: str | Path) -> Path:
        """Write bank.safetensors (arrays) and bank.json (names) into `directory`; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        samples, sample_index = np.unique(self.sample_ids, return_inverse=True)
        tensors = {"embeddings": self.embeddings, "expression": self.expression,
                   "sample_index": sample_index.astype(np.int32)}
        meta = {"format": _BANK_FORMAT, "version": 1, "n_spots": len(self),
                "dim": int(self.embeddings.shape[1]), "n_genes": int(self.expression.shape[1]),
                "samples": samples.tolist(), "barcodes": self.barcodes.tolist(), "genes": self.genes}
        # Write beside, then rename: a crash never leaves a half-written bank under the final name.
        tmp_tensors, tmp_meta = directory / (BANK_TENSORS + ".tmp"), directory / (BANK_META + ".tmp")
        save_file(tensors, str(tmp_tensors))
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_tensors, directory / BANK_TENSORS)
        os.replace(tmp_meta, directory / BANK_META)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ReferenceBank":
        """Read a bank written by `save`; ModelDirError when files are missing or disagree."""
        directory = Path(directory)
        tensors_path, meta_path = directory / BANK_TENSORS, directory / BANK_META
        for path in (tensors_path, meta_path):
            if not path.is_file():
                raise ModelDirError(f"No retrieval bank file {path}: was this model fitted with a "
                                    "reference bank? Re-run fit with retrieval enabled or drop --retrieve-k.")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelDirError(f"{meta_path} is not valid JSON ({exc}); the bank is damaged.") from exc
        if meta.get("format") != _BANK_FORMAT:
            raise ModelDirError(f"{meta_path} is not a genedml reference bank (format={meta.get('format')!r}).")
        tensors = load_file(str(tensors_path))
        missing = {"embeddings", "expression", "sample_index"} - set(tensors)
        if missing:
            raise ModelDirError(f"{tensors_path} lacks arrays {sorted(missing)}; the bank is damaged.")
        m = len(tensors["embeddings"])
        if m != meta["n_spots"] or len(meta["barcodes"]) != m:
            raise ModelDirError(f"{directory}: bank arrays hold {m} spots but {meta_path} lists "
                                f"{meta['n_spots']} spots / {len(meta['barcodes'])} barcodes.")
        samples = np.asarray(meta["samples"], dtype=str)
        return cls(tensors["embeddings"], tensors["expression"], samples[tensors["sample_index"]],
                   np.asarray(meta["barcodes"], dtype=str), meta.get("genes"))


# -------------------------------------------------------------------------------------------- index

_GPU_RESOURCES: "faiss.StandardGpuResources | None" = None  # one per process: holds GPU scratch memory


def _gpu_decision(use_gpu: bool | None) -> tuple[bool, str]:
    """Whether to put the index on a GPU, and why (for the one log line)."""
    has_build = hasattr(faiss, "StandardGpuResources")
    n_gpus = faiss.get_num_gpus() if has_build else 0
    if use_gpu is False:
        return False, "GPU disabled by caller"
    if n_gpus > 0:
        return True, f"{n_gpus} GPU(s) visible to faiss"
    why = "faiss-cpu build, no GPU support" if not has_build else "GPU build, but no GPU devices visible"
    if use_gpu:
        raise GenedmlError(f"A GPU index was requested but faiss cannot use one ({why}). Install faiss-gpu "
                           "(uninstall faiss-cpu first) on a machine with CUDA, or leave use_gpu unset.")
    return False, why


def _place(index: faiss.Index, use_gpu: bool | None) -> faiss.Index:
    """Move a CPU index to GPU 0 when asked/available; log which one is used and why."""
    global _GPU_RESOURCES
    on_gpu, why = _gpu_decision(use_gpu)
    if not on_gpu:
        log.info("faiss: CPU index (%s)", why)
        return index
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    log.info("faiss: GPU index on device 0 (%s)", why)
    options = faiss.GpuClonerOptions()
    # IVF-PQ: float16 lookup tables (64 sub-quantisers x 256 centroids in float32 exceed 48 KB shared memory).
    options.useFloat16 = isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ)
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index, options)


def _is_gpu(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Number of IVF lists scanned per query (recall vs speed); no-op for a flat index."""
    if _is_gpu(index):
        if hasattr(index, "nprobe"):
            index.nprobe = int(nprobe)
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index: nothing to set
        return
    ivf.nprobe = int(min(nprobe, ivf.nlist))


def default_nlist(m: int) -> int:
    """IVF lists for a bank of `m` spots: ~4 sqrt(m), at least 39 spots per list, at most 65,536."""
    return max(1, min(round(4 * math.sqrt(m)), m // _POINTS_PER_LIST, _MAX_NLIST))


def default_pq_m(dim: int) -> int:
    """Sub-quantisers (code bytes) for `dim`-d vectors: the largest divisor of dim <= min(dim / 4, 64).

    A byte per 4 dimensions up to 256-d; 64 bytes above (faiss' GPU IVF-PQ handles at most 96).
    """
    return max(d for d in range(1, max(1, min(dim // 4, _MAX_PQ_M)) + 1) if dim % d == 0)


def min_ivfpq_spots(nbits: int = _PQ_NBITS) -> int:
    """Smallest bank an ivfpq index trains on: 39 points per centroid of each 2^nbits sub-quantiser."""
    return _POINTS_PER_LIST * 2 ** nbits


def _ivf_lists(m: int, nlist: int | None) -> int:
    nlist = nlist or default_nlist(m)
    if nlist > m:
        log.warning("nlist=%d exceeds the bank size %d; using nlist=%d", nlist, m, m)
        nlist = m
    return nlist


def _ivfpq(x: np.ndarray, nlist: int | None, pq_m: int | None, nbits: int) -> faiss.Index:
    """An untrained IVF-PQ index for `x`, or an InputError when the bank is too small or m does not fit."""
    m, dim = x.shape
    if m < min_ivfpq_spots(nbits):
        raise InputError(
            f"an 'ivfpq' index needs at least {min_ivfpq_spots(nbits):,} reference spots to train its "
            f"{2 ** nbits}-centroid product quantisers ({_POINTS_PER_LIST} per centroid); this bank has {m:,}. "
            "Use index kind 'flat' (exact, fine up to a few million spots) or 'ivf'.")
    pq_m = pq_m or default_pq_m(dim)
    if dim % pq_m:
        raise InputError(f"pq_m={pq_m} sub-quantisers must divide the embedding dimension {dim}; "
                         f"try {default_pq_m(dim)}.")
    return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, _ivf_lists(m, nlist), pq_m, nbits,
                            faiss.METRIC_INNER_PRODUCT)


def build_index(embeddings: np.ndarray, kind: IndexKind = "flat", nlist: int | None = None,
                nprobe: int | None = None, use_gpu: bool | None = None, pq_m: int | None = None,
                nbits: int = _PQ_NBITS) -> faiss.Index:
    """Inner-product index over L2-normalised `embeddings` (cosine similarity).

    ``flat`` is exact (fine up to a few million spots). ``ivf`` clusters the bank into `nlist` lists
    (default ~4 sqrt(M), at least 39 spots per list, at most 65,536; k-means on at most 64 spots per list)
    and scans `nprobe` of them per query (default nlist / 8; nprobe = nlist is exact). ``ivfpq`` is ``ivf``
    with each vector stored as a product-quantised code of `pq_m` bytes (default: a sub-quantiser per 4
    dimensions up to 64 bytes, see `default_pq_m`) instead of 4 * dim bytes, for banks of 10^6-10^7
    spots; it needs at least 9,984 spots to train. Its scores are approximate even at nprobe = nlist, so
    `retrieve_predict` re-ranks its shortlist exactly (`search_bank`). `use_gpu` None = GPU when faiss
    sees one. `index_params` reads the chosen settings back.
    """
    x = np.asarray(embeddings)
    _check_matrix("bank embeddings", x)
    if len(x) == 0:
        raise InputError("cannot build a retrieval index over an empty reference bank.")
    x = l2_normalise(x)
    m, dim = x.shape
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind in ("ivf", "ivfpq"):
        if kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, _ivf_lists(m, nlist),
                                       faiss.METRIC_INNER_PRODUCT)
        else:
            index = _ivfpq(x, nlist, pq_m, nbits)
        index.cp.max_points_per_centroid = _TRAIN_POINTS_PER_LIST  # faiss subsamples, seeded
        index.train(x)  # faiss' Python wrapper keeps the quantizer alive as long as `index`
        set_nprobe(index, nprobe or max(1, index.nlist // 8))
    else:
        raise GenedmlError(f"unknown index kind {kind!r}: choose 'flat' (exact), 'ivf' (large banks) or "
                           "'ivfpq' (10^6+ spots, compressed).")
    index.add(x)
    return _place(index, use_gpu)


def index_params(index: faiss.Index) -> dict[str, Any]:
    """The kind and settings of an index, read from the index itself (what save_index records and
    load_index logs). A GPU index is copied to the CPU to read them."""
    cpu = faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index
    params: dict[str, Any] = {"kind": "flat", "metric": "inner product on L2-normalised embeddings",
                              "spots": int(cpu.ntotal), "dim": int(cpu.d)}
    try:
        ivf = faiss.extract_index_ivf(cpu)
    except RuntimeError:  # not an IVF index
        return params
    params.update(kind="ivf", nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    if pq is not None:
        params.update(kind="ivfpq", pq_m=int(pq.M), nbits=int(pq.nbits), code_bytes=int(pq.code_size))
    return params


def describe_index(params: dict[str, Any]) -> str:
    """One line for logs: 'ivfpq index, 1,000,000 spots x 256-d, nlist=4000 nprobe=500 pq_m=64 nbits=8'."""
    settings = " ".join(f"{k}={params[k]}" for k in ("nlist", "nprobe", "pq_m", "nbits") if k in params)
    return f"{params['kind']} index, {params['spots']:,} spots x {params['dim']}-d" + (f", {settings}" if settings else "")


def _index_path(path: str | Path) -> Path:
    path = Path(path)
    return path / INDEX_FILE if path.is_dir() else path


def index_meta_path(path: str | Path) -> Path:
    """The JSON record written beside an index file: index.faiss -> index.json."""
    return Path(path).with_suffix(".json")


def save_index(index: faiss.Index, path: str | Path) -> Path:
    """Write `index` with faiss.write_index (a GPU index is copied to CPU first) and its kind and
    settings (`index_params`) as JSON beside it. `path`: a file, or an existing directory (a model's
    bank directory) to write INDEX_FILE into. Returns the index file's path."""
    path = _index_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(cpu, str(tmp))
    meta = index_meta_path(path)
    tmp_meta = meta.with_name(meta.name + ".tmp")
    tmp_meta.write_text(json.dumps({"format": _INDEX_FORMAT, "version": 1, "file": path.name,
                                    "faiss": faiss.__version__} | index_params(cpu), indent=2))
    os.replace(tmp, path)
    os.replace(tmp_meta, meta)
    return path


def load_index(path: str | Path, use_gpu: bool | None = None) -> faiss.Index:
    """Read an index written by `save_index` (a file, or a directory holding INDEX_FILE), on GPU when
    asked/available; logs its kind and settings."""
    path = _index_path(path)
    if not path.is_file():
        raise ModelDirError(f"No retrieval index at {path}: was this model fitted with a reference bank?")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise ModelDirError(f"{path} is not a readable faiss index ({exc}).") from exc
    log.info("faiss: loaded %s from %s", describe_index(index_params(index)), path)
    return _place(index, use_gpu)


# ------------------------------------------------------------------------------------------- search


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of each query: (similarity (Q, k) float32, index (Q, k) int64).

    k is capped at the bank size (with a warning). An IVF index may return fewer than k hits; those
    slots hold index -1 (``aggregate`` ignores them).
    """
    q = np.asarray(queries)
    _check_matrix("queries", q, index.d)
    if index.ntotal == 0:
        raise InputError("the retrieval index is empty: build it over a non-empty reference bank.")
    if k < 1:
        raise GenedmlError(f"k must be at least 1, got {k}.")
    if _is_gpu(index) and k > _GPU_MAX_K:
        raise GenedmlError(f"k={k} exceeds the {_GPU_MAX_K} neighbours a faiss GPU index can return; "
                           "use a smaller k or a CPU index (use_gpu=False).")
    if k > index.ntotal:
        log.warning("k=%d exceeds the reference bank size %d; using k=%d", k, index.ntotal, index.ntotal)
        k = int(index.ntotal)
    similarity, neighbor_idx = index.search(l2_normalise(q), int(k))
    return similarity.astype(np.float32, copy=False), neighbor_idx.astype(np.int64, copy=False)


def brute_force_topk(bank: "ReferenceBank | np.ndarray", queries: np.ndarray, k: int,
                     chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BLEEP's way: the full (Q, M) cosine similarity matrix by matmul, then torch.topk.

    The reference the FAISS path is tested and benchmarked against. `chunk_size` queries at a time bounds
    the (chunk, M) matrix; None = all queries at once, as BLEEP does.
    """
    import torch

    embeddings = bank.embeddings if isinstance(bank, ReferenceBank) else l2_normalise(bank)
    keys = torch.from_numpy(embeddings)
    q = torch.from_numpy(l2_normalise(queries))
    k = min(int(k), keys.shape[0])
    step = chunk_size or max(1, len(q))
    sims, idxs = [], []
    for start in range(0, len(q), step):
        values, indices = torch.topk(q[start:start + step] @ keys.T, k, dim=1)
        sims.append(values)
        idxs.append(indices)
    return torch.cat(sims).numpy(), torch.cat(idxs).numpy().astype(np.int64)


def _is_pq(index: faiss.Index) -> bool:
    """Whether `index` scores with product-quantised codes (approximate similarities)."""
    if _is_gpu(index):
        return "IVFPQ" in type(index).__name__
    return isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ)


def rerank(bank_embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query among its `candidates` (bank rows; -1 = none), by cosine similarity with
    the bank's unit-row float32 embeddings (a ReferenceBank's): (similarity (Q, k) float32, index (Q, k)
    int64, -1 where there are fewer candidates)."""
    q = l2_normalise(queries)
    candidates = np.asarray(candidates, dtype=np.int64)
    n, width = candidates.shape
    k = min(int(k), width)
    step = max(1, _CHUNK_BYTES // max(1, width * q.shape[1] * 4))
    similarity = np.empty((n, k), dtype=np.float32)
    neighbor_idx = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, step):
        cand = candidates[s:s + step]
        score = np.einsum("qkd,qd->qk", bank_embeddings[np.maximum(cand, 0)], q[s:s + step])
        score[cand < 0] = -np.inf
        order = np.argsort(-score, axis=1, kind="stable")[:, :k]
        similarity[s:s + step] = np.take_along_axis(score, order, axis=1)
        neighbor_idx[s:s + step] = np.where(np.isfinite(similarity[s:s + step]),
                                            np.take_along_axis(cand, order, axis=1), -1)
    return similarity, neighbor_idx


def search_bank(index: faiss.Index, bank_embeddings: np.ndarray, queries: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """`search`, except that an ivfpq index only shortlists RERANK_FACTOR * k candidates, which are then
    ranked exactly from the bank's embeddings: PQ scores alone found 64-71% of the exact top 10 at 10^5-10^6
    spots, the shortlist 99-100% (benchmarks/RESULTS.md), and the bank holds the embeddings anyway."""
    if not _is_pq(index):
        return search(index, queries, k)
    if k > index.ntotal:
        log.warning("k=%d exceeds the reference bank size %d; using k=%d", k, index.ntotal, index.ntotal)
    cap = _GPU_MAX_K if _is_gpu(index) else index.ntotal
    shortlist = max(min(RERANK_FACTOR * int(k), index.ntotal, cap), min(int(k), index.ntotal))
    _, candidates = search(index, queries, shortlist)
    return rerank(bank_embeddings, queries, candidates, k)


# ---------------------------------------------------------------------------------------- aggregate


def _l1_distances(query: np.ndarray, bank_embeddings: np.ndarray, neighbor_idx: np.ndarray) -> np.ndarray:
    """(Q, k) L1 distance between each query and its neighbours' embeddings, in bounded-memory chunks."""
    q = l2_normalise(query)  # the same unit sphere the search ran on
    n, k = neighbor_idx.shape
    step = max(1, _CHUNK_BYTES // max(1, k * q.shape[1] * 4))
    out = np.empty((n, k), dtype=np.float64)
    for s in range(0, n, step):
        gathered = bank_embeddings[np.maximum(neighbor_idx[s:s + step], 0)].astype(np.float32)
        gathered /= np.maximum(np.linalg.norm(gathered, axis=2, keepdims=True), 1e-12)
        out[s:s + step] = np.abs(gathered - q[s:s + step, None, :]).sum(axis=2)
    return out


def neighbor_weights(neighbor_idx: np.ndarray, similarity: np.ndarray, weighting: str = "uniform",
                     tau: float = 0.07, query: np.ndarray | None = None,
                     bank_embeddings: np.ndarray | None = None) -> np.ndarray:
    """(Q, k) float64 weights summing to 1 per row (rows with no valid neighbour are all zero)."""
    valid = neighbor_idx >= 0
    if weighting == "uniform":
        raw = valid.astype(np.float64)
    elif weighting == "softmax":
        if tau <= 0:
            raise GenedmlError(f"softmax temperature tau must be > 0, got {tau}.")
        logits = np.where(valid, similarity.astype(np.float64) / tau, -np.inf)
        top = logits.max(axis=1, keepdims=True)
        raw = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    elif weighting == "inverse-l1":
        if query is None or bank_embeddings is None:
            raise GenedmlError("weighting 'inverse-l1' needs the queries and the bank embeddings.")
        distance = _l1_distances(np.asarray(query), np.asarray(bank_embeddings), neighbor_idx)
        raw = np.where(valid, 1.0 / np.maximum(distance, _L1_EPS) ** 2, 0.0)
    else:
        raise GenedmlError(f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}.")
    total = raw.sum(axis=1, keepdims=True)
    return np.divide(raw, total, out=np.zeros_like(raw), where=total > 0)


def aggregate(expression_bank: np.ndarray, neighbor_idx: np.ndarray, similarity: np.ndarray,
              weighting: str = "uniform", tau: float = 0.07, query: np.ndarray | None = None,
              bank_embeddings: np.ndarray | None = None) -> np.ndarray:
    """(Q, G) weighted mean of the neighbours' expression; see the module docstring for the weightings.

    Slots with index -1 (an IVF search that found fewer than k) get weight 0; a query with no valid
    neighbour at all is predicted as NaN.
    """
    neighbor_idx = np.asarray(neighbor_idx, dtype=np.int64)
    weights = neighbor_weights(neighbor_idx, np.asarray(similarity), weighting, tau, query, bank_embeddings)
    expression = np.asarray(expression_bank, dtype=np.float32)
    n, k = neighbor_idx.shape
    # A sparse (Q, M) weight matrix times the bank: no (Q, k, G) temporary, one pass over the rows used.
    w = sp.csr_matrix((weights.astype(np.float32).ravel(), np.maximum(neighbor_idx, 0).ravel(),
                       np.arange(0, n * k + 1, k)), shape=(n, len(expression)))
    prediction = np.asarray(w @ expression, dtype=np.float32)
    empty = ~(neighbor_idx >= 0).any(axis=1)
    if empty.any():
        prediction[empty] = np.nan
    return prediction


def blend(retrieved: np.ndarray, regressed: np.ndarray, w: float) -> np.ndarray:
    """w * retrieved + (1 - w) * regressed: w = 1 is retrieval only, w = 0 regression only."""
    if not 0.0 <= w <= 1.0:
        raise GenedmlError(f"blend weight must lie in [0, 1], got {w}.")
    if np.shape(retrieved) != np.shape(regressed):
        raise GenedmlError(f"cannot blend retrieval {np.shape(retrieved)} with regression "
                           f"{np.shape(regressed)}: both must be (spots, genes) over the same panel.")
    if w == 1.0:
        return np.asarray(retrieved, dtype=np.float32)
    if w == 0.0:
        return np.asarray(regressed, dtype=np.float32)
    return (w * np.asarray(retrieved) + (1.0 - w) * np.asarray(regressed)).astype(np.float32)


@dataclass
class RetrievalResult:
    """prediction (Q, G) float32; neighbor_idx (Q, k) int64 rows of the bank; similarity (Q, k) float32."""

    prediction: np.ndarray
    neighbor_idx: np.ndarray
    similarity: np.ndarray


def retrieve_predict(bank: ReferenceBank, index: faiss.Index, queries: np.ndarray, k: int = 50,
                     weighting: str = "uniform", tau: float = 0.07, blend_w: float = 1.0,
                     regressed: np.ndarray | None = None) -> RetrievalResult:
    """Search the bank with image embeddings `queries`, aggregate neighbours' expression, blend."""
    if index.ntotal != len(bank):
        raise ModelDirError(f"the retrieval index holds {index.ntotal} spots but the bank {len(bank)}: "
                            "they come from different fits; rebuild the index from the bank.")
    if blend_w < 1.0 and regressed is None:
        raise GenedmlError(f"blend weight {blend_w} < 1 needs the regression prediction to blend with.")
    similarity, neighbor_idx = search_bank(index, bank.embeddings, queries, k)
    needs_l1 = weighting == "inverse-l1"
    retrieved = aggregate(bank.expression, neighbor_idx, similarity, weighting, tau,
                          query=queries if needs_l1 else None,
                          bank_embeddings=bank.embeddings if needs_l1 else None)
    prediction = retrieved if regressed is None and blend_w == 1.0 else blend(retrieved, regressed, blend_w)
    return RetrievalResult(prediction, neighbor_idx, similarity)
