"""`genedml fit`: targets from the data, features from the cache, a head, and a model directory."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import genedml
from genedml.spots import feature_bytes, load_spot_features, stream_spot_features
from genedml.cache.store import FeatureCache
from genedml.jsonio import jsonable
from genedml.data.sample import Sample
from genedml.errors import CacheMismatchError, ConfigError, InputError
from genedml.heads.features import SpotFeatures, StreamedSpots
from genedml.model_dir import BANK_DIR, CONFIG, HEAD_DIR, PROTOTYPES, TARGETS, check_model_out, fit_prototypes, staged_model_dir
from genedml.metrics import mean_gene_pcc
from genedml.targets import LOG_KINDS, TargetSpec, fit_targets, targets_at
from genedml.threads import threads_for_head, torch_threads
from genedml.typed import check_fields, check_unique, flag_of
from genedml.log import log



GENE_SELECT = ("mean", "variance")
LOG_TRANSFORMS = ("log1p", "log10", "none")
INDEX_KINDS = ("flat", "ivf", "ivfpq")
# With fewer patients, holding one out would leave too little to train on: validation takes sections instead.
MIN_PATIENTS_FOR_PATIENT_SPLIT = 3
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: str | int | None) -> int | None:
    """'8GB', '512MiB', '2.5G' or a byte count → bytes (1 GB = 10⁹ B); None stays None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        if isinstance(value, int) and value <= 0:
            raise ConfigError(f"--max-memory must be > 0, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-memory must be a size such as 8GB, 500MB or 16GiB, got {value!r}")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class FitSettings:
    """Everything `fit` needs besides paths; `head` is the chosen head's typed settings.

    `head` may be given as a mapping (e.g. from a notebook); it is turned into the head's settings here,
    so an unknown or misspelt key fails before any work, naming the closest valid key.
    """

    model: str = "genedml"
    genes: int = 250
    gene_select: str = "mean"
    gene_list: Path | None = None
    normalize_over: str = "panel"
    log: str = "log1p"
    smooth: bool = False
    train_samples: list[str] | None = None
    val_samples: list[str] | None = None
    val_fraction: float = 0.2
    seed: int = 2021
    expect_backbone: str | None = None
    index: str = "flat"
    # Bytes of cached features a fit may hold in memory; a larger training set is streamed from the cache a
    # slide group at a time (neural heads). None: always in memory.
    max_memory: int | str | None = None
    head: Any = None

    def __post_init__(self) -> None:
        from genedml.heads.registry import head_class, head_settings

        check_fields(self, flag_of)  # e.g. smooth="no" (truthy) from a notebook would smooth
        cls = head_class(self.model)
        if self.head is None or isinstance(self.head, Mapping):
            self.head = head_settings(self.model, self.head or {})
        elif not isinstance(self.head, cls.Settings):
            raise ConfigError(f"settings of type {type(self.head).__name__} given for head {self.model!r}, which takes {cls.Settings.__name__}")
        if self.genes < 1:  # the type is checked above
            raise ConfigError(f"--genes must be an integer >= 1, got {self.genes!r}")
        if self.gene_select not in GENE_SELECT:
            raise ConfigError(f"--gene-select must be one of {', '.join(GENE_SELECT)}, got {self.gene_select!r}")
        check_unique("--train-samples", self.train_samples)
        check_unique("--val-samples", self.val_samples)
        both = sorted(set(self.train_samples or []) & set(self.val_samples or []))
        if both:
            raise ConfigError(f"{', '.join(both)} in both --train-samples and --val-samples: a validation section must be "
                              "held out of training (omit --train-samples to train on every sample not in validation)")
        if self.log not in LOG_KINDS:
            raise ConfigError(f"--log must be one of {', '.join(LOG_KINDS)}, got {self.log!r}")
        if self.normalize_over not in ("panel", "all"):
            raise ConfigError(f"--normalize-over must be panel or all, got {self.normalize_over!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        self.max_memory = parse_bytes(self.max_memory)
        if self.gene_list is not None and not Path(self.gene_list).is_file():
            raise ConfigError(f"--gene-list {self.gene_list} is not a file (one gene symbol per line)")


@dataclass
class FitResult:
    model_dir: Path
    train_samples: list[str]
    val_samples: list[str]
    history: dict[str, Any]
    seconds: float
    weights: str

    def summary_line(self) -> str:
        best = self.history.get("best_val_pcc")
        text = (
            f"fit: {self.model_dir} — train {self.train_samples}, validation {self.val_samples or 'none'}, "
            f"best epoch {self.history.get('best_epoch')}, validation PCC {best if best is None else round(best, 4)}, "
            f"{self.seconds:.1f}s"
        )
        if self.weights == "random-init":
            text += " [weights: random-init backbone — not a biology result]"
        return text


def split_samples(
    available: Sequence[str], train: Sequence[str] | None, val: Sequence[str] | None, val_fraction: float, seed: int,
    patients: dict[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split by sample, never by spot (spots of one section are correlated); by patient where possible.

    Without `val`, validation takes ceil(val_fraction x n) of the n training samples at random. When
    `patients` (sample -> patient) covers every training sample and they come from at least
    `MIN_PATIENTS_FOR_PATIENT_SPLIT` patients, validation takes whole patients instead (ceil(val_fraction x
    patients) of them): a section of a patient that is also in training keeps scoring better while the model
    gets worse on new patients, so early stopping on it keeps an over-fitted model (benchmarks/RESULTS.md,
    "genedml 0.7").
    """
    unknown = sorted((set(train or []) | set(val or [])) - set(available))
    if unknown:
        raise InputError(f"Samples {unknown} are not complete in the cache (available: {list(available)}).")
    val = list(val or [])
    train = [s for s in (train or available) if s not in val]
    if not train:
        raise InputError("No training samples left after removing the validation samples.")
    if not val and val_fraction > 0:
        if len(train) < 2:
            log.warning("only one training sample: no validation split, training runs for the fixed number of epochs")
            return train, val
        rng = np.random.default_rng(seed)
        groups = sorted({patients[s] for s in train}) if patients and all(s in patients for s in train) else []
        if len(groups) >= MIN_PATIENTS_FOR_PATIENT_SPLIT:
            held = {groups[i] for i in rng.permutation(len(groups))[: max(1, math.ceil(val_fraction * len(groups)))]}
            val = sorted(s for s in train if patients[s] in held)  # type: ignore[index]
            log.info("fit: validation holds out %d of %d patients (%s): %d sections", len(held), len(groups),
                     ", ".join(sorted(held)), len(val))
        else:
            order = rng.permutation(len(train))
            n_val = min(len(train) - 1, max(1, math.ceil(val_fraction * len(train))))
            val = sorted(train[i] for i in order[:n_val])
        train = [s for s in train if s not in val]
    return train, val


def validation_kind(train_ids: Sequence[str], val_ids: Sequence[str], patients: Mapping[str, str]) -> str:
    """What the validation samples measure: other patients, sections of training patients, or nothing."""
    if not val_ids:
        return "none"
    if all(s in patients for s in [*train_ids, *val_ids]) and not {patients[s] for s in val_ids} & {patients[s] for s in train_ids}:
        return "patients not in training"
    return "sections (patients may also be in training)"


def known_patients(cache: FeatureCache, sample_ids: Sequence[str]) -> dict[str, str]:
    """sample -> patient for the samples whose patient the data named (not guessed from the sample id)."""
    attrs = {s: cache.sample_attrs(s) for s in sample_ids}
    return {s: str(a["patient_id"]) for s, a in attrs.items() if a.get("patient_known") and a.get("patient_id") is not None}


def load_split(
    cache: FeatureCache, samples: dict[str, Sample], ids: Sequence[str], spec: TargetSpec, *, stream: bool = False
) -> tuple[SpotFeatures | StreamedSpots, np.ndarray]:
    feats = stream_spot_features(cache, ids) if stream else load_spot_features(cache, ids)
    y = np.concatenate([targets_at(samples[s], feats.barcodes[feats.slide == i], spec) for i, s in enumerate(ids)])
    return feats, y


def memory_plan(cache: FeatureCache, ids: Sequence[str], settings: FitSettings) -> tuple[FitSettings, bool]:
    """Whether the features of `ids` must be streamed to stay within `--max-memory`, and the settings to use.

    Streaming reads slides as batches need them, so batches must be slide-aware: `batch_slides=0` (the
    authors' sampling) becomes 1, with a warning. Closed-form heads need every feature at once: refused.
    """
    if settings.max_memory is None:
        return settings, False
    need = feature_bytes(cache, ids)
    if need <= settings.max_memory:
        log.info("fit: the features take %.2f GB, within --max-memory %.2f GB: held in memory", need / 1e9, settings.max_memory / 1e9)
        return settings, False
    if not hasattr(settings.head, "batch_slides"):
        raise InputError(
            f"the features of the {len(ids)} samples take {need / 1e9:.2f} GB, over --max-memory "
            f"{settings.max_memory / 1e9:.2f} GB, and the {settings.model} head needs them all in memory; raise "
            "--max-memory, use fewer samples, or a neural head (genedml, triplex, bleep), which streams them"
        )
    head = settings.head
    if head.batch_slides == 0:
        log.warning("fit: streaming needs slide-aware batches: batch_slides 0 (the authors' sampling) becomes 1")
        head = replace(head, batch_slides=1)
    log.info("fit: the features take %.2f GB, over --max-memory %.2f GB: slides are read from the cache as "
             "batches need them (batches of at most %d slide(s))", need / 1e9, settings.max_memory / 1e9, head.batch_slides)
    return replace(settings, head=head), True


def check_backbone(cache: FeatureCache, expected: str | None) -> None:
    if expected and cache.settings.get("backbone") != expected:
        raise CacheMismatchError(
            f"Cache {cache.root} was made with backbone '{cache.settings.get('backbone')}', not '{expected}'."
        )


def fit_model(
    cache_dir: str | Path | FeatureCache,
    data: str | Path | None,
    out: str | Path,
    settings: FitSettings,
    *,
    read_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    samples: dict[str, Sample] | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Fit `settings.model` on cached features and write the model directory `out`.

    Expression comes from `samples` when given (cv reads the data once), else from reading `data`. The
    directory is written under a staging name and renamed into place when complete; an existing model at
    `out` is replaced only with `overwrite` and stays intact until then.
    """
    from genedml.data import read_samples
    from genedml.heads.registry import make_head

    start = time.perf_counter()
    out = Path(out)
    check_model_out(out, overwrite)  # before any work
    cache = cache_dir if isinstance(cache_dir, FeatureCache) else FeatureCache(cache_dir)
    check_backbone(cache, settings.expect_backbone)
    available = cache.samples()  # one scan of the cache (it checks every sample's completeness)
    named = set(settings.train_samples or available) | set(settings.val_samples or [])
    patients = known_patients(cache, [s for s in available if s in named])
    train_ids, val_ids = split_samples(available, settings.train_samples, settings.val_samples, settings.val_fraction,
                                       settings.seed, patients=patients)
    if samples is None:
        if data is None:
            raise InputError("fit needs the dataset (--data) to build expression targets.")
        read_kwargs = {k: v for k, v in (read_kwargs or {}).items() if v is not None}
        samples = {s.sample_id: s for s in read_samples(data, samples=train_ids + val_ids, **read_kwargs)}

    gene_list = None
    if settings.gene_list is not None:
        gene_list = [g.strip() for g in Path(settings.gene_list).read_text().splitlines() if g.strip()]
    spec = fit_targets(
        [samples[s] for s in train_ids], n_genes=settings.genes, select=settings.gene_select, gene_list=gene_list,
        normalize_over=settings.normalize_over, log=settings.log, smooth=settings.smooth,
    )
    settings, stream = memory_plan(cache, train_ids + val_ids, settings)
    train, y_train = load_split(cache, samples, train_ids, spec, stream=stream)
    val, y_val = load_split(cache, samples, val_ids, spec, stream=stream) if val_ids else (None, None)

    head = make_head(settings.model, settings.head)
    weights = str(cache.settings.get("weights"))
    if weights == "random-init":
        log.warning("the cache was made with a random-init backbone: the fitted model is not a biology result")
    history = _fit_head(head, train, y_train, val, y_val, progress)
    if val is not None and history.get("best_val_pcc") is None:
        # Heads without epochs (ridge) are scored on the same validation split for the record.

        history = {**history, "best_val_pcc": float(mean_gene_pcc(head.predict(val), y_val)), "selection": "closed form (validation scored, not used)"}

    with staged_model_dir(out, overwrite) as stage:
        seconds = _write_model(stage, head, spec, train, y_train, settings, cache, train_ids, val_ids, weights, history, start,
                               validation_kind(train_ids, val_ids, patients))
    return FitResult(out, train_ids, val_ids, history, seconds, weights)


def _write_model(
    out: Path, head: Any, spec: TargetSpec, train: SpotFeatures | StreamedSpots, y_train: np.ndarray, settings: FitSettings, cache: FeatureCache,
    train_ids: list[str], val_ids: list[str], weights: str, history: dict[str, Any], start: float, validation: str,
) -> float:
    """Every file of the model directory into `out` (a staging folder); returns the fit's seconds."""
    head.save(out / HEAD_DIR)
    (out / TARGETS).write_text(spec.to_json())
    bank_info = write_bank(out, head, train, y_train, spec, settings)
    seconds = time.perf_counter() - start
    config = {
        "genedml_version": genedml.__version__,
        "model": settings.model,
        "fit_settings": jsonable(asdict(settings)),
        "head_config": head.config(),
        "genes": spec.panel,
        "train_samples": train_ids,
        "val_samples": val_ids,
        "selection": "validation split carved from the training samples" if val_ids else "last epoch (no validation samples)",
        "validation": validation,
        "n_train_spots": int(len(train)),
        "features_streamed": isinstance(train, StreamedSpots),
        "spot_pitch_um": spot_pitch_um(cache, train_ids),
        "cache": str(cache.root.resolve()),
        "cache_settings": cache.settings,
        "weights": weights,
        "best_epoch": history.get("best_epoch"),
        "best_val_pcc": history.get("best_val_pcc"),
        "fit_seconds": round(seconds, 2),
        "bank": bank_info,
    }
    (out / CONFIG).write_text(json.dumps(jsonable(config), indent=2))
    _write_curve(out, history, "random-init backbone: not a biology result" if weights == "random-init" else None)
    return seconds


def spot_pitch_um(cache: FeatureCache, sample_ids: Sequence[str]) -> float:
    """Median centre-to-centre spot distance of the training samples in µm (default virtual-spot pitch)."""
    from scipy.spatial import cKDTree

    pitches = []
    for sample_id in sample_ids:
        centers = cache.read(sample_id, names=["centers"]).arrays["centers"]
        if len(centers) > 1:
            dist, _ = cKDTree(centers).query(centers, k=2)
            pitches.append(float(np.median(dist[:, 1])) * float(cache.sample_attrs(sample_id)["mpp"]))
    return round(float(np.median(pitches)), 3) if pitches else 100.0


def head_width(settings: Any) -> int | None:
    """The hidden width of a neural head (what sizes its matrix products), None for closed-form heads."""
    for name in ("dim", "proj_dim"):
        value = getattr(settings, name, None)
        if isinstance(value, int):
            return value
    return None


def _fit_head(head: Any, train: SpotFeatures, y_train: np.ndarray, val: SpotFeatures | None, y_val: np.ndarray | None, progress: bool) -> dict[str, Any]:
    epochs = int(getattr(head.settings, "epochs", 0) or 0)
    with torch_threads(threads_for_head(head_width(head.settings), len(train)) if epochs else None):
        if progress and epochs:
            from genedml.progress import EpochProgress

            with EpochProgress(epochs, f"fit {head.name}") as bar:
                return head.fit(train, y_train, val, y_val, progress=bar).history_
        return head.fit(train, y_train, val, y_val).history_


def write_bank(out: Path, head: Any, train: SpotFeatures, y_train: np.ndarray, spec: TargetSpec, settings: FitSettings) -> dict[str, Any]:
    """Reference bank (gene embeddings + expression of training spots), its FAISS index, and prototypes."""
    from genedml.retrieval import ReferenceBank, build_index, save_index

    emb = head.embed_genes(y_train)
    if emb is None:
        return {"retrieval": False, "reason": f"head '{settings.model}' has no gene embedding (no contrastive pathway)"}
    sample_ids = np.array(train.sample_ids)[train.slide]
    bank = ReferenceBank(emb, y_train, sample_ids, train.barcodes, genes=spec.panel)
    bank.save(out / BANK_DIR)
    index = build_index(bank.embeddings, kind=settings.index)
    save_index(index, out / BANK_DIR)  # writes retrieval.INDEX_FILE there
    k = int(getattr(settings.head, "groups", 18))
    protos = fit_prototypes(bank.embeddings, y_train, k, settings.seed)
    protos.save(out / PROTOTYPES)
    return {"retrieval": True, "spots": len(bank), "dim": int(bank.embeddings.shape[1]), "index": f"{settings.index} (inner product on L2-normalised embeddings)", "prototypes": int(len(protos.sizes))}


def _write_curve(out: Path, history: dict[str, Any], note: str | None) -> None:
    """curve.json (the full history) and curve.png (one series per loss part and the validation PCC)."""
    (out / "curve.json").write_text(json.dumps(jsonable(history), indent=2))
    epochs = history.get("epochs") or []
    if epochs:
        from genedml.plots import training_curve

        names = [k for k in epochs[0] if k != "epoch"]
        series = {"epoch": [e["epoch"] for e in epochs]} | {k: [np.nan if e.get(k) is None else e[k] for e in epochs] for k in names}
        training_curve(series, out / "curve.png", note=note)

