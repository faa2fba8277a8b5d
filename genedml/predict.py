"""`genedml predict`: regression and FAISS retrieval predictions written as AnnData (.h5ad).

`X` holds predictions on the model's gene panel in the model's normalised scale (library size to
`target_sum` over the panel or all genes, then log1p/log10 — see `uns['genedml']['targets']`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence


from genedml.spots import load_spot_features
from genedml.cache.store import FeatureCache, settings_diff
from genedml.errors import CacheMismatchError, ConfigError, ModelDirError
from genedml.heads.features import SpotFeatures
from genedml.output import cached_sample_view, log_view, write_prediction
from genedml.model_dir import BANK_DIR, HEAD_DIR, INDEX_FILE, PROTOTYPES, Prototypes, manifest_id, open_model_dir, read_config, read_targets
from genedml.log import log
from genedml.typed import check_fields, check_unique, flag_of



@dataclass(frozen=True)
class RetrievalSettings:
    k: int = 50
    weighting: str = "uniform"
    tau: float = 0.07
    blend: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self, flag_of)
        if self.k < 1:  # the type is checked above
            raise ConfigError(f"--retrieve-k must be an integer >= 1 (the number of reference spots), got {self.k!r}.")
        if not 0.0 <= self.blend <= 1.0:
            raise ConfigError(f"--blend must be in [0, 1], got {self.blend}.")
        if self.weighting not in ("uniform", "softmax", "inverse-l1"):
            raise ConfigError(f"--weighting must be uniform, softmax or inverse-l1, got {self.weighting!r}.")
        if not self.tau > 0:
            raise ConfigError(f"--tau must be > 0, got {self.tau}.")
        if self.tau != RetrievalSettings.tau and self.weighting != "softmax":  # only softmax has a temperature: it was ignored
            raise ConfigError(f"--tau applies only to --weighting softmax, not {self.weighting!r}.")


class Predictor:
    """A loaded model directory: head, target spec, and (when present) reference bank, index, prototypes.

    The directory's files are checked against its manifest first, and the manifest id again after each
    load, so a model replaced by `fit --overwrite` while it is read is refused rather than mixed.
    """

    def __init__(self, model_dir: str | Path) -> None:
        from genedml.heads import load_head

        self.model_dir, manifest = open_model_dir(model_dir)
        self.manifest_id = None if manifest is None else str(manifest["id"])
        self.config = read_config(self.model_dir)
        self.targets = read_targets(self.model_dir)
        self.head = load_head(self.model_dir / HEAD_DIR)
        self.genes = list(self.config["genes"])
        self._bank: Any = None
        self._index: Any = None
        self._prototypes: Prototypes | None = None
        self._check_unchanged()

    def _check_unchanged(self) -> None:
        if self.manifest_id is not None and manifest_id(self.model_dir) != self.manifest_id:
            raise ModelDirError(f"{self.model_dir} was replaced (genedml fit --overwrite) while it was being read; run again.")

    @property
    def has_bank(self) -> bool:
        return (self.model_dir / BANK_DIR / INDEX_FILE).is_file()

    def bank(self) -> tuple[Any, Any]:
        if self._bank is None:
            from genedml.retrieval import ReferenceBank, load_index

            if not self.has_bank:
                reason = self.config.get("bank", {}).get("reason", "no reference bank in the model dir")
                raise ModelDirError(f"--retrieve-k needs a reference bank: {reason}. Use --model genedml or bleep.")
            self._bank = ReferenceBank.load(self.model_dir / BANK_DIR)
            self._index = load_index(self.model_dir / BANK_DIR)
            self._check_unchanged()
        return self._bank, self._index

    def prototypes(self) -> Prototypes | None:
        if self._prototypes is None and (self.model_dir / PROTOTYPES).is_file():
            self._prototypes = Prototypes.load(self.model_dir / PROTOTYPES)
            self._check_unchanged()
        return self._prototypes

    def check_cache(self, cache: FeatureCache) -> None:
        """Refuse features made with another backbone, weights or geometry than the model was trained on."""
        # Dihedral views are a training-time augmentation: predicting from a cache without them is fine.
        diff = settings_diff(self.config["cache_settings"], cache.settings, ignore=frozenset({"augment"}))
        if diff:
            raise CacheMismatchError(
                f"Cache {cache.root} does not match model {self.model_dir}:\n  - " + "\n  - ".join(diff)
                + "\nExtract these samples with the model's backbone and settings (see its config.json)."
            )

    def predict(self, feats: SpotFeatures, retrieval: RetrievalSettings | None) -> dict[str, Any]:
        """Predictions and, for retrieval, neighbour indices/similarities and prototype groups."""
        regressed = self.head.predict(feats) if (retrieval is None or retrieval.blend < 1.0) else None
        out: dict[str, Any] = {"X": regressed}
        # The bank first: a model without one fails with the reason before any embedding is computed.
        bank_index = self.bank() if retrieval is not None else None
        query = self.head.embed_image(feats) if (retrieval is not None or self.prototypes() is not None) else None
        if retrieval is not None:
            from genedml.retrieval import retrieve_predict

            if query is None:
                raise ModelDirError(f"head '{self.config['model']}' has no image embedding to query the bank with.")
            bank, index = bank_index
            result = retrieve_predict(bank, index, query, retrieval.k, retrieval.weighting, retrieval.tau, retrieval.blend, regressed)
            out.update(X=result.prediction, knn_index=result.neighbor_idx, knn_similarity=result.similarity)
        protos = self.prototypes()
        if protos is not None and query is not None:
            out["group"] = protos.assign(query)
            out["n_groups"] = len(protos.sizes)
        return out

    def provenance(self, retrieval: RetrievalSettings | None) -> dict[str, Any]:
        cs = self.config["cache_settings"]
        return {
            "model_dir": str(self.model_dir.resolve()),
            "model": self.config["model"],
            "backbone": cs.get("backbone"),
            "weights": cs.get("weights"),
            "random_init": cs.get("weights") == "random-init",
            "note": "random-init backbone: not a biology result" if cs.get("weights") == "random-init" else "",
            "mode": "regression" if retrieval is None else ("retrieval" if retrieval.blend == 1.0 else "blend"),
            "retrieval": asdict(retrieval) if retrieval else None,
            "targets": self.targets.to_dict() | {"panel": None},
            "scale": f"normalised: library size to {self.targets.target_sum:g} over {self.targets.normalize_over}, then {self.targets.log}"
            + (", 3x3 smoothed" if self.targets.smooth else ""),
        }


def predict_cache(
    model_dir: str | Path,
    cache_dir: str | Path,
    out: str | Path,
    *,
    samples: Sequence[str] | None = None,
    retrieval: RetrievalSettings | None = None,
    read_image: bool = True,
) -> list[Path]:
    """Predict every requested cached sample; one `<sample>.h5ad` per sample in `out`.

    Each file carries `uns['spatial']` for scanpy/squidpy: a thumbnail of the image the features were
    extracted from (read again from the path the cache recorded; `read_image=False` skips it).
    """
    predictor = Predictor(model_dir)
    cache = FeatureCache(cache_dir)
    predictor.check_cache(cache)
    ids = list(samples or cache.samples())
    check_unique("--samples", ids)
    cache.require(ids)
    provenance = predictor.provenance(retrieval)
    if provenance["random_init"]:
        log.warning("predictions come from a random-init backbone: not a biology result")
    paths = []
    for sample_id in ids:
        feats = load_spot_features(cache, [sample_id], with_aug=False)
        centers = cache.read(sample_id, names=["centers"]).arrays["centers"]
        pred = predictor.predict(feats, retrieval)
        view = cached_sample_view(cache.sample_attrs(sample_id), centers, read_image=read_image)
        log_view(sample_id, view)
        paths.append(write_prediction(Path(out) / f"{sample_id}.h5ad", sample_id, feats.barcodes, centers, predictor.genes, pred, provenance, spatial=view))
    return paths
