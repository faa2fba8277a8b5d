"""FAISS retrieval: exactness against brute force, persistence, weighting rules, blending, edge cases."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from genedml.errors import GenedmlError, InputError, ModelDirError
from genedml.retrieval import (
    INDEX_FILE,
    ReferenceBank,
    aggregate,
    blend,
    brute_force_topk,
    build_index,
    index_params,
    load_index,
    min_ivfpq_spots,
    rerank,
    retrieve_predict,
    save_index,
    search,
    set_nprobe,
)


def _numpy_topk(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: cosine similarity by NumPy, sorted descending."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ b.T.astype(np.float64)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), order


@pytest.fixture()
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    # Unnormalised on purpose: the index must normalise (cosine), not rely on the caller.
    bank = rng.standard_normal((1200, 24)).astype(np.float32) * rng.uniform(0.5, 3.0, (1200, 1))
    queries = rng.standard_normal((40, 24)).astype(np.float32) * 5
    return bank, queries


def _bank(embeddings: np.ndarray, genes: int = 6, seed: int = 0) -> ReferenceBank:
    rng = np.random.default_rng(seed)
    m = len(embeddings)
    return ReferenceBank(embeddings, rng.random((m, genes), dtype=np.float32),
                         np.array([f"S{i % 3}" for i in range(m)]), np.array([f"bc{i}" for i in range(m)]),
                         [f"G{j}" for j in range(genes)])


def _assert_same_topk(sim_a, idx_a, sim_b, idx_b, atol=1e-5):
    np.testing.assert_allclose(sim_a, sim_b, atol=atol)
    # Indices must agree except where neighbouring similarities are tied within tolerance.
    gaps = np.abs(np.diff(sim_b, axis=1))
    tied = np.zeros_like(idx_b, dtype=bool)
    tied[:, :-1] |= gaps < atol
    tied[:, 1:] |= gaps < atol
    assert np.array_equal(idx_a[~tied], idx_b[~tied])


def test_flat_index_equals_numpy_brute_force(vectors):
    bank, queries = vectors
    sim, idx = search(build_index(bank, "flat"), queries, 15)
    ref_sim, ref_idx = _numpy_topk(bank, queries, 15)
    assert sim.dtype == np.float32 and idx.dtype == np.int64 and sim.shape == (40, 15)
    _assert_same_topk(sim, idx, ref_sim, ref_idx)


def test_torch_brute_force_equals_numpy_reference(vectors):
    bank, queries = vectors
    ref_sim, ref_idx = _numpy_topk(bank, queries, 9)
    for chunk in (None, 7):
        sim, idx = brute_force_topk(bank, queries, 9, chunk_size=chunk)
        _assert_same_topk(sim, idx, ref_sim, ref_idx)


def test_ivf_with_all_lists_probed_equals_flat(vectors):
    bank, queries = vectors
    ivf = build_index(bank, "ivf", nlist=16)
    set_nprobe(ivf, 16)
    flat_sim, flat_idx = search(build_index(bank, "flat"), queries, 10)
    sim, idx = search(ivf, queries, 10)
    _assert_same_topk(sim, idx, flat_sim, flat_idx)


def test_ivf_default_nlist_keeps_39_points_per_list(vectors):
    bank, _ = vectors
    ivf = build_index(bank, "ivf")
    assert ivf.nlist == len(bank) // 39 and 1 <= ivf.nprobe < ivf.nlist


def test_index_reports_cpu_choice_in_one_log_line(vectors, caplog):
    bank, _ = vectors
    with caplog.at_level(logging.INFO, logger="genedml"):
        build_index(bank, use_gpu=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "genedml"]
    assert lines == ["faiss: CPU index (GPU disabled by caller)"]


@pytest.mark.gpu
def test_gpu_index_gives_the_cpu_results(vectors):
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no GPU build or sees no GPU")
    bank, queries = vectors
    for kind in ("flat", "ivf"):
        cpu = build_index(bank, kind, nlist=16, nprobe=16, use_gpu=False)
        gpu = build_index(bank, kind, nlist=16, nprobe=16, use_gpu=True)
        _assert_same_topk(*search(gpu, queries, 10), *search(cpu, queries, 10), atol=1e-4)


def test_explicit_gpu_request_without_gpu_is_an_error(vectors):
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(GenedmlError, match="faiss-gpu"):
        build_index(vectors[0], use_gpu=True)


def test_index_save_load_round_trip_keeps_results_and_nprobe(vectors, tmp_path):
    bank, queries = vectors
    ivf = build_index(bank, "ivf", nlist=8, nprobe=3)
    path = save_index(ivf, tmp_path / "model" / "retrieval.faiss")
    loaded = load_index(path)
    assert loaded.ntotal == len(bank) and loaded.nprobe == 3
    for a, b in zip(search(ivf, queries, 5), search(loaded, queries, 5)):
        np.testing.assert_array_equal(a, b)


def _clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 40, rank: int = 8) -> np.ndarray:
    """Points near `clusters` random unit centres, spread along a `rank`-d subspace per cluster (embeddings
    of tissue lie on a low-dimensional manifold, not in isotropic noise), plus a little isotropic noise."""
    centre_rng = np.random.default_rng(99)  # the same clusters for the bank and the queries
    centres = centre_rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = centre_rng.standard_normal((clusters, rank, dim)).astype(np.float32) / np.sqrt(dim)
    label = rng.integers(0, clusters, n)
    spread = np.einsum("nr,nrd->nd", 0.5 * rng.standard_normal((n, rank)).astype(np.float32), bases[label])
    return centres[label] + spread + 0.05 / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_bank() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return _clustered(12_000, 32, rng), _clustered(200, 32, rng)


@pytest.fixture(scope="module")
def ivfpq_index(clustered_bank):
    """Built once: training the product quantiser takes a few seconds."""
    return build_index(clustered_bank[0], "ivfpq")


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact)]))


def test_ivfpq_recalls_most_exact_neighbours_and_round_trips(clustered_bank, ivfpq_index, tmp_path, caplog):
    bank, queries = clustered_bank
    ivfpq = ivfpq_index
    params = index_params(ivfpq)
    # nlist = min(4 sqrt(12000), 12000 // 39) = 307; a one-byte sub-quantiser per 4 of the 32 dimensions.
    assert params == {"kind": "ivfpq", "metric": "inner product on L2-normalised embeddings", "spots": 12_000,
                      "dim": 32, "nlist": 307, "nprobe": 38, "pq_m": 8, "nbits": 8, "code_bytes": 8}
    _, exact = search(build_index(bank, "flat"), queries, 10)
    _, found = search(ivfpq, queries, 10)
    # Measured 0.79 here (ivf: 1.00): 8-byte codes blur the order inside a cluster. Not a tie-break test.
    assert _recall(found, exact) >= 0.65
    path = save_index(ivfpq, tmp_path)  # a directory: the index goes to INDEX_FILE in it
    assert path == tmp_path / INDEX_FILE and sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index.json"]
    assert json.loads((tmp_path / "index.json").read_text())["kind"] == "ivfpq"
    with caplog.at_level(logging.INFO, logger="genedml"):
        loaded = load_index(tmp_path)
    assert index_params(loaded) == params
    assert any("loaded ivfpq index, 12,000 spots x 32-d, nlist=307 nprobe=38 pq_m=8 nbits=8" in r.getMessage()
               for r in caplog.records)
    for a, b in zip(search(ivfpq, queries, 10), search(loaded, queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_retrieve_predict_reranks_the_ivfpq_shortlist_exactly(clustered_bank, ivfpq_index):
    bank = _bank(clustered_bank[0])
    queries = clustered_bank[1]
    flat = retrieve_predict(bank, build_index(bank.embeddings, "flat"), queries, k=10)
    approx = retrieve_predict(bank, ivfpq_index, queries, k=10)
    # The 40-candidate PQ shortlist holds nearly all of the exact top 10 (PQ order alone: 0.79).
    assert _recall(approx.neighbor_idx, flat.neighbor_idx) >= 0.95
    exact_sim = np.einsum("qkd,qd->qk", bank.embeddings[approx.neighbor_idx],
                          queries / np.linalg.norm(queries, axis=1, keepdims=True))
    np.testing.assert_allclose(approx.similarity, exact_sim, atol=1e-5)  # exact scores, sorted
    assert (np.diff(approx.similarity, axis=1) <= 0).all()


def test_rerank_orders_candidates_and_keeps_missing_slots_empty():
    keys = np.eye(3, dtype=np.float32)
    sim, idx = rerank(keys, np.array([[0.1, 0.9, 0.3]], dtype=np.float32), np.array([[0, 1, -1]]), 3)
    assert idx.tolist() == [[1, 0, -1]] and np.isinf(sim[0, 2])
    np.testing.assert_allclose(sim[0, :2], np.array([0.9, 0.1]) / np.linalg.norm([0.1, 0.9, 0.3]), rtol=1e-6)


def test_ivfpq_on_too_small_a_bank_says_how_many_spots_it_needs(clustered_bank):
    bank, _ = clustered_bank
    assert min_ivfpq_spots() == 9_984
    with pytest.raises(InputError, match=r"at least 9,984 reference spots.*has 9,983.*'flat'"):
        build_index(bank[:9_983], "ivfpq")


def test_ivfpq_sub_quantisers_must_divide_the_dimension(clustered_bank):
    with pytest.raises(InputError, match="pq_m=5 .* divide the embedding dimension 32"):
        build_index(clustered_bank[0], "ivfpq", pq_m=5)


def test_unknown_index_kind_lists_the_kinds(vectors):
    with pytest.raises(GenedmlError, match="'flat'.*'ivf'.*'ivfpq'"):
        build_index(vectors[0], "hnsw")


def test_flat_and_ivf_params_are_recorded_beside_the_index(vectors, tmp_path):
    bank, _ = vectors
    save_index(build_index(bank, "flat"), tmp_path / "flat.faiss")
    flat = json.loads((tmp_path / "flat.json").read_text())
    assert flat["kind"] == "flat" and flat["spots"] == 1200 and "nlist" not in flat
    save_index(build_index(bank, "ivf", nlist=8, nprobe=3), tmp_path / "ivf.faiss")
    ivf = json.loads((tmp_path / "ivf.json").read_text())
    assert (ivf["kind"], ivf["nlist"], ivf["nprobe"], ivf["file"]) == ("ivf", 8, 3, "ivf.faiss")


def test_load_index_missing_file_names_path(tmp_path):
    with pytest.raises(ModelDirError, match="retrieval.faiss"):
        load_index(tmp_path / "retrieval.faiss")


def test_bank_save_load_round_trip(vectors, tmp_path):
    bank = _bank(vectors[0])
    bank.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.json", "bank.safetensors"]
    loaded = ReferenceBank.load(tmp_path)
    np.testing.assert_array_equal(loaded.embeddings, bank.embeddings)
    np.testing.assert_array_equal(loaded.expression, bank.expression)
    assert loaded.sample_ids.tolist() == bank.sample_ids.tolist()
    assert loaded.barcodes.tolist() == bank.barcodes.tolist()
    assert loaded.genes == bank.genes
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings, axis=1), 1.0, atol=1e-6)


def test_bank_load_missing_dir_is_model_dir_error(tmp_path):
    with pytest.raises(ModelDirError, match="bank.safetensors"):
        ReferenceBank.load(tmp_path)


def test_bank_rejects_mismatched_rows():
    with pytest.raises(InputError, match="barcodes"):
        ReferenceBank(np.ones((3, 2)), np.ones((3, 4)), np.array(["a"] * 3), np.array(["x", "y"]))


def test_queries_with_nan_rows_are_named(vectors):
    bank, queries = vectors
    queries = queries.copy()
    queries[[4, 11]] = np.nan
    with pytest.raises(InputError, match=r"2 rows, first rows \[4, 11\]"):
        search(build_index(bank), queries, 3)


def test_query_dimension_mismatch_is_input_error(vectors):
    bank, queries = vectors
    with pytest.raises(InputError, match="23 columns"):
        search(build_index(bank), queries[:, :23], 3)


# ------------------------------------------------------------------ weighting rules, derived by hand

EXPR = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0], [100.0, 100.0]], dtype=np.float32)
IDX = np.array([[0, 1, 2], [2, 0, 1]])
SIM = np.array([[0.9, 0.5, 0.1], [0.3, 0.3, 0.3]], dtype=np.float32)


def test_uniform_weighting_is_plain_mean():
    # Both rows average bank rows 0, 1, 2: (1+3+5)/3 = 3, (10+20+30)/3 = 20.
    out = aggregate(EXPR, IDX, SIM, "uniform")
    np.testing.assert_allclose(out, [[3.0, 20.0], [3.0, 20.0]], rtol=1e-6)


def test_softmax_weighting_matches_hand_computation():
    # Row 0, tau = 0.4: logits 2.25, 1.25, 0.25 -> weights e^2 : e^1 : 1 over (e^2 + e + 1).
    e = np.e
    w = np.array([e**2, e, 1.0]) / (e**2 + e + 1.0)
    row0 = w @ EXPR[[0, 1, 2]]
    out = aggregate(EXPR, IDX, SIM, "softmax", tau=0.4)
    np.testing.assert_allclose(out[0], row0, rtol=1e-5)
    # Row 1: equal similarities -> equal weights -> plain mean.
    np.testing.assert_allclose(out[1], [3.0, 20.0], rtol=1e-5)


def test_inverse_l1_weighting_matches_hand_computation():
    # Unit vectors on axes; the query is e0. L1 distances: to e0 = 0 (guarded), to e1 = 2, to -e0 = 2.
    keys = np.array([[0.0, 1.0], [-1.0, 0.0], [0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    query = np.array([[2.0, 0.0]], dtype=np.float32)  # normalises to e0
    idx = np.array([[0, 1, 2]])  # distances 2, 2, |1-0.6| + |0-0.8| = 1.2
    w = np.array([1 / 4, 1 / 4, 1 / 1.44])
    w /= w.sum()
    out = aggregate(EXPR, idx, np.zeros((1, 3)), "inverse-l1", query=query, bank_embeddings=keys)
    np.testing.assert_allclose(out[0], w @ EXPR[:3], rtol=1e-5)
    # A neighbour at distance 0 takes (almost) all the weight instead of dividing by zero.
    out = aggregate(EXPR, np.array([[0, 3]]), np.zeros((1, 2)), "inverse-l1", query=query, bank_embeddings=keys)
    np.testing.assert_allclose(out[0], EXPR[3], rtol=1e-5)


def test_k1_is_bleep_top1_copy_for_every_weighting(vectors):
    bank = _bank(vectors[0])
    index = build_index(bank.embeddings)
    queries = vectors[0][[5, 17]] + 1e-3  # near bank spots 5 and 17
    for weighting in ("uniform", "softmax", "inverse-l1"):
        res = retrieve_predict(bank, index, queries, k=1, weighting=weighting)
        assert res.neighbor_idx[:, 0].tolist() == [5, 17]
        np.testing.assert_array_equal(res.prediction, bank.expression[[5, 17]])


def test_missing_neighbours_get_no_weight_and_empty_rows_are_nan():
    out = aggregate(EXPR, np.array([[1, -1], [-1, -1]]), np.array([[0.5, -3e38], [-3e38, -3e38]]), "softmax")
    np.testing.assert_allclose(out[0], EXPR[1])
    assert np.isnan(out[1]).all()


def test_unknown_weighting_lists_choices():
    with pytest.raises(GenedmlError, match="uniform, softmax, inverse-l1"):
        aggregate(EXPR, IDX, SIM, "gaussian")


# ------------------------------------------------------------------------------------ blend, k cap


def test_blend_endpoints_and_midpoint():
    retrieved, regressed = np.full((2, 3), 4.0), np.full((2, 3), 2.0)
    np.testing.assert_array_equal(blend(retrieved, regressed, 1.0), retrieved)
    np.testing.assert_array_equal(blend(retrieved, regressed, 0.0), regressed)
    np.testing.assert_allclose(blend(retrieved, regressed, 0.25), 2.5)
    with pytest.raises(GenedmlError, match=r"\[0, 1\]"):
        blend(retrieved, regressed, 1.5)


def test_retrieve_predict_blend_zero_and_one(vectors):
    bank = _bank(vectors[0])
    index = build_index(bank.embeddings)
    queries = vectors[1]
    regressed = np.full((len(queries), 6), -1.0, dtype=np.float32)
    pure = retrieve_predict(bank, index, queries, k=4)
    np.testing.assert_array_equal(
        retrieve_predict(bank, index, queries, k=4, blend_w=1.0, regressed=regressed).prediction,
        pure.prediction)
    np.testing.assert_array_equal(
        retrieve_predict(bank, index, queries, k=4, blend_w=0.0, regressed=regressed).prediction, regressed)
    np.testing.assert_allclose(pure.prediction, bank.expression[pure.neighbor_idx].mean(axis=1), rtol=1e-5)


def test_k_larger_than_bank_is_capped_with_a_logged_warning(caplog):
    import logging

    bank = _bank(np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32))
    index = build_index(bank.embeddings)
    logger = logging.getLogger("genedml")
    logger.addHandler(caplog.handler)  # the CLI's logging setup may stop "genedml" from propagating to pytest
    try:
        res = retrieve_predict(bank, index, np.ones((2, 4), dtype=np.float32), k=9)
    finally:
        logger.removeHandler(caplog.handler)
    assert "k=9 exceeds the reference bank size 5" in caplog.text
    assert res.neighbor_idx.shape == (2, 5)
    assert sorted(res.neighbor_idx[0].tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(res.prediction[0], bank.expression.mean(axis=0), rtol=1e-5)


def test_index_bank_size_mismatch_is_model_dir_error(vectors):
    bank = _bank(vectors[0])
    with pytest.raises(ModelDirError, match="different fits"):
        retrieve_predict(bank, build_index(vectors[0][:100]), vectors[1], k=3)
