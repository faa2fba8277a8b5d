"""benchmarks/pathway_diagnostics.py: per-term gradients reach the modules each term should reach, and only those."""

from __future__ import annotations

from pathlib import Path

from conftest import load_benchmark as load


def test_each_loss_term_reaches_its_modules_and_the_kmeans_groups_are_reported(tmp_path: Path) -> None:
    from genedml.cache.store import FeatureCache
    from genedml.data import read_samples

    scale, small, diag = load("scale"), load("small_cohort"), load("pathway_diagnostics")
    built = scale.build_cohort(tmp_path / "work", 3 * 40, 8, 40, genes=30, mpp=0.25, seed=0)
    ids = built["samples"]
    samples = {s.sample_id: s for s in read_samples(built["data"])}
    head = {"dim": 16, "epochs": 1, "min_epoch_steps": 1, "batch_size": 32, "groups": 4, "global_depth": 1,
            "neighbor_depth": 1}
    small.fit_and_score(FeatureCache(built["cache"]), samples, "genedml", head, ids[:2], [ids[2]], [ids[2]],
                        tmp_path / "model")
    record = diag.main([str(tmp_path / "model"), "--cache", str(built["cache"]), "--data", str(built["data"]),
                        "--samples-table", str(tmp_path / "none.csv"), "--batches", "2", "--out", str(tmp_path / "d.json")])
    grads = record["mean_grad_norm"]
    # Both contrastive terms are weighted by default (0.1 each), so both labels name their weight.
    assert set(grads) == {"regression", "instance (x instance_weight)", "group (x lambda)"}
    # regression trains the regression MLP, never the gene encoder or the cluster head; the contrastive
    # terms reach the gene encoder and the fusion encoder (t, n, gl are taken after fusion), not the regressor
    assert grads["regression"]["regression"] > 0 and grads["regression"]["gene_encoder"] == 0
    assert grads["regression"]["cluster_head"] == 0
    assert grads["instance (x instance_weight)"]["fusion"] > 0 and grads["instance (x instance_weight)"]["gene_encoder"] > 0
    assert grads["instance (x instance_weight)"]["regression"] == 0
    assert grads["group (x lambda)"]["cluster_head"] > 0 and grads["group (x lambda)"]["regression"] == 0
    kmeans = record["mean_kmeans"]
    assert 0 <= kmeans["image_largest_share"] <= 1 and -1 <= kmeans["adjusted_rand_image_vs_gene"] <= 1
    assert record["curve"]["best"] is not None and record["chance"]["group"] > 0
