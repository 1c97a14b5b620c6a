"""Causal evidence: feature_effects (a comparison's top features ablated in the reader, beside controls)
and criterion_effects (the same for the features that go with one metadata criterion of a dataset)."""

from pathlib import Path

import numpy as np
import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from interp_assets.analysis import reports
from interp_assets.analysis.associations import metadata_criteria
from interp_assets.causal import effects
from interp_assets.comparisons import parse_comparison_key
from interp_assets.defs.document_assets import reader_hook_index
from interp_assets.defs.partitions import comparisons_partitions, datasets_partitions
from interp_assets.defs.shared import (
    INPUTS_KEY,
    MODEL_POOL,
    MODEL_STEP_TAGS,
    OWNERS,
    cached_document_embeddings,
    column_schema,
    inputs_key,
    latest_materialization,
    reuse_stored_output,
    stored_documents,
)
from interp_assets.engine.documents import (
    LEXICAL_PROJECTION_FILE,
    document_sae_problem,
    hidden_state_index,
    load_document_sae,
)
from interp_assets.engine.reader import model_layer_count
from interp_assets.storage.parquet import markdown_preview, read_table, table_exists, write_bytes_atomic
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

EFFECTS_CODE_VERSION = "1"


class FeatureEffectsConfig(Config):
    """Which features to ablate and how much evidence to gather for each."""

    features: list[int] = []  # empty: the diff's top significant token-level features per direction
    # Defaults sized for the main job on a CPU (one traced forward pass per feature and control, over
    # documents_per_feature + unaffected_documents documents); raise them on a GPU.
    top_n: int = 2  # per direction, when `features` is empty
    documents_per_feature: int = 16  # documents where the feature fires (its side's dataset)
    unaffected_documents: int = 4  # documents where it does not fire (side effects)
    reference_documents: int = 100  # per dataset, besides the edited ones: their unedited embeddings fix
    # the scores' directions
    n_controls: int = 10
    n_boot: int = 1000
    seed: int = 0


def _targets(diff: pl.DataFrame, config: FeatureEffectsConfig, key: str) -> list[tuple[int, str]]:
    """(feature, direction) pairs to measure."""
    if not config.features:
        top = reports.top_features(diff, config.top_n)
        return [(int(f), d) for d in ("a", "b") for f in top[d]["feature"].to_list()]
    known = dict(zip(diff["feature"].to_list(), diff["direction"].to_list(), strict=True))
    missing = [f for f in config.features if f not in known]
    if missing:
        raise ValueError(
            f"feature_effects [{key}]: features {missing} are not in this comparison's diff_features "
            f"(token family, {len(known)} features). Use feature ids of the comparison's SAE."
        )
    return [(int(f), known[f]) for f in config.features]


def _firing_documents(base: str, dataset: str, feature: int) -> set[int]:
    """The documents of `dataset` where `feature` fires (token_activations)."""
    frame = read_table(base, "token_activations", dataset).filter(pl.col("feature") == feature)
    return set(frame.select("doc_id").unique().collect()["doc_id"].to_list())


def _edited_documents(
    ids: list, fires: set, config: "FeatureEffectsConfig | CriterionEffectsConfig", rng: np.random.Generator
) -> list:
    """Documents to edit for one feature: some where it fires, a few where it does not (side effects)."""
    on = [d for d in ids if d in fires]
    off = [d for d in ids if d not in fires]
    return _sample(on, config.documents_per_feature, rng) + _sample(off, config.unaffected_documents, rng)


def _sample(ids: list[str], n: int, rng: np.random.Generator) -> list[str]:
    if len(ids) <= n:
        return ids
    return [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False))]


def _reference_embeddings(
    storage: StorageResource, docs: pl.DataFrame, sae_reader: SAEReaderResource
) -> np.ndarray:
    """Unedited document embeddings of `docs` (doc_hash, text; row i = docs row i) as the effect scores pool
    the reader's output (last layer, normalized): from the embeddings cache, which the token pass fills for
    BERT readers; the missing ones embedded now."""
    vectors, _ = cached_document_embeddings(
        storage, docs, sae_reader.model, None, True, device=sae_reader.device, dtype=sae_reader.dtype
    )
    return vectors.astype(np.float64)


def _document_family(
    context: AssetExecutionContext, storage: StorageResource, key: str, sae_reader: SAEReaderResource
) -> tuple[str, int | None, bool] | None:
    """Where the comparison's document SAE is saved, with the layer (counted from the end) and normalization
    its embeddings were made with (`effects.DocumentFamily`'s), when its features lie downstream of the
    reader's edit: None (with a log line saying why) when there is no document SAE, its save is damaged,
    it also reads lexical profiles (token features at the edited hook itself, not downstream of it), the
    datasets' document_embeddings came from another model or settings, or from a hidden state at or before
    the edit, however its layer was given (the default, the SAE's own layer: set document_embeddings'
    `layer` to -1 for the last). Reads the model's configuration; loads no weights."""
    reader_model = sae_reader.model
    base = storage.parquet_base
    if not table_exists(base, "document_sae", key):
        context.log.info(f"feature_effects [{key}]: no document_sae; downstream features not measured.")
        return None
    path = read_table(base, "document_sae", key).collect()["model_path"][0]
    why = document_sae_problem(path)
    if why is None and (Path(path) / LEXICAL_PROJECTION_FILE).exists():
        why = "it reads lexical profiles (token features at the edited layer), not only the embedding"
    settings = set()
    for dataset in parse_comparison_key(key):
        record = latest_materialization(context.instance, "document_embeddings", dataset)
        metadata = record.asset_materialization.metadata if record is not None else {}
        settings.add(
            tuple(metadata[m].value if m in metadata else None for m in ("model", "layer", "normalize"))
        )
    found = sorted(settings, key=str)
    model, layer, normalize = found[0] if len(found) == 1 else (None, None, None)
    if why is None and (model != reader_model or normalize is None):
        why = (
            f"the datasets' document_embeddings (model, layer, normalize) are {found}, not one setting "
            f"recorded for this reader's model {reader_model!r}; materialize document_embeddings again"
        )
    from_end = None
    if why is None:
        n_layers = model_layer_count(reader_model)
        index = hidden_state_index(None if layer in (None, "last") else int(layer), n_layers)
        edit = reader_hook_index(sae_reader)
        if index <= edit:
            why = (
                f"the document embeddings are the hidden state {index}, at or before the edit (hidden state "
                f"{edit}), not downstream of it; materialize document_embeddings with a later layer (e.g. -1)"
            )
        # counted from the end: an edited pass records the hidden states after the edit only (the blocks
        # before it are replayed), so the positions from the end are the ones that hold
        from_end = index - (n_layers + 1)
    if why is not None:
        context.log.warning(f"feature_effects [{key}]: downstream features not measured: {why}.")
        return None
    return path, from_end, bool(normalize)


@asset(
    partitions_def=comparisons_partitions,
    io_manager_key="parquet_io_manager",
    group_name="analysis",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    metadata=column_schema("feature_effects"),
    code_version=EFFECTS_CODE_VERSION,
    pool=MODEL_POOL,
    op_tags=MODEL_STEP_TAGS,
    deps=[
        AssetDep("diff_reports"),
        AssetDep("diff_features"),
        AssetDep("token_activations", partition_mapping=AllPartitionMapping()),
        AssetDep("raw_documents", partition_mapping=AllPartitionMapping()),
        AssetDep("document_sae"),
        AssetDep("document_embeddings", partition_mapping=AllPartitionMapping()),
    ],
    description="Causal evidence for the diff's top token-level features: each is ablated inside the reader "
    "(nnsight) on documents where it fires; the shift of the document embedding along the feature's "
    "signature and along the comparison (for causal LMs, the change of next-token log-probability; with the "
    "comparison's document SAE, the change of its document features) is compared with frequency-matched "
    "random features and a placebo, with bootstrap intervals. Adds a 'Causal evidence' section to the "
    "comparison's report.",
)
def feature_effects(
    context: AssetExecutionContext,
    config: FeatureEffectsConfig,
    sae_reader: SAEReaderResource,
    storage: StorageResource,
):
    key = context.partition_key
    a, b = parse_comparison_key(key)
    base = storage.parquet_base
    if not table_exists(base, "diff_features", key):
        raise FileNotFoundError(
            f"feature_effects [{key}]: no diff_features yet; materialize diff_reports first."
        )
    fingerprint = sae_reader.get_identity().fingerprint
    downstream = _document_family(context, storage, key, sae_reader)
    upstream = [("diff_reports", key), ("token_activations", a), ("token_activations", b)]
    if downstream is not None:  # the records then depend on the document family too
        upstream += [("document_sae", key), ("document_embeddings", a), ("document_embeddings", b)]
    inputs = inputs_key(
        context.instance,
        upstream,
        {"config": config.model_dump(), "reader": fingerprint, "document_family": downstream is not None},
        EFFECTS_CODE_VERSION,
    )
    reused = reuse_stored_output(context, storage, "feature_effects", key, inputs)
    if reused is not None:
        # a report written again since (e.g. after its file was lost) gets the section back
        if any(reports.CAUSAL_START not in page for page in _report_pages(storage, key).values()):
            stored = read_table(base, "feature_effects", key).collect()
            _write_causal_section(storage, key, effects.effect_summary(stored), config.n_controls)
        return reused
    family = None
    if downstream is not None:
        path, layer, normalize = downstream
        family = effects.DocumentFamily(load_document_sae(path), layer=layer, normalize=normalize)

    diff = read_table(base, "diff_features", key).filter(pl.col("family") == "token").collect()
    targets = _targets(diff, config, key)
    side = {"a": a, "b": b}
    docs = {ds: stored_documents(storage, ds).select("doc_id", "doc_hash", "text") for ds in (a, b)}
    text_of = {ds: dict(docs[ds].select("doc_id", "text").iter_rows()) for ds in (a, b)}
    fires = {(feature, ds): _firing_documents(base, ds, feature) for feature, _ in targets for ds in (a, b)}
    rng = np.random.default_rng(config.seed)
    edited: dict[int, list[str]] = {}
    used: dict[str, set[str]] = {a: set(), b: set()}
    for feature, direction in targets:
        ds = side[direction]
        edited[feature] = _edited_documents(docs[ds]["doc_id"].to_list(), fires[(feature, ds)], config, rng)
        used[ds] |= set(edited[feature])
    # Directions come from unedited embeddings: a sample of each dataset plus every document edited.
    reference = {
        ds: sorted(set(_sample(docs[ds]["doc_id"].to_list(), config.reference_documents, rng)) | used[ds])
        for ds in (a, b)
    }
    emb = {ds: _reference_embeddings(storage, _rows(docs[ds], reference[ds]), sae_reader) for ds in (a, b)}
    reader = sae_reader.get_reader()
    with reader.forward_lock:
        both = np.vstack([emb[a], emb[b]])
        plan = []
        for feature, direction in targets:
            ds, other = side[direction], side["b" if direction == "a" else "a"]
            fired = np.array([d in fires[(feature, x)] for x in (a, b) for d in reference[x]], dtype=bool)
            try:
                signature = effects.mean_difference_direction(both[fired], both[~fired], seed=config.seed)
                comparison = effects.mean_difference_direction(emb[ds], emb[other], seed=config.seed)
            except ValueError as exc:
                context.log.warning(f"feature_effects [{key}]: feature {feature} not measured: {exc}")
                continue
            texts = [text_of[ds][d] for d in edited[feature]]
            plan.append(effects.EffectTarget(feature, direction, texts, signature, comparison))
        records = effects.feature_effects(
            reader,
            plan,
            n_controls=config.n_controls,
            n_boot=config.n_boot,
            seed=config.seed,
            document_family=family,
        )
    summary = effects.effect_summary(records)
    table = records.with_columns(
        pl.lit(key).alias("comparison"),
        pl.lit(a).alias("dataset_a"),
        pl.lit(b).alias("dataset_b"),
    )
    directions = pl.DataFrame(
        [
            {
                "target_feature": t.feature,
                "signature_auc": t.signature.held_out_auc,
                "comparison_auc": t.comparison.held_out_auc,
            }
            for t in plan
        ],
        schema={"target_feature": pl.Int64, "signature_auc": pl.Float64, "comparison_auc": pl.Float64},
    )
    table = table.join(directions, on="target_feature", how="left")

    _write_causal_section(storage, key, summary, config.n_controls)

    shown = summary.select(
        "feature", "direction", "score_name", "documents", "effect", "controls_beyond", "evidence"
    )
    return Output(
        table,
        data_version=DataVersion(inputs) if inputs else None,
        metadata={
            INPUTS_KEY: inputs,
            "features_measured": summary["feature"].n_unique(),
            "features_with_evidence": int(summary["evidence"].sum()),
            "downstream_features_measured": family is not None,
            "effects": MetadataValue.md(markdown_preview(shown.to_arrow(), max_rows=shown.height)),
        },
    )


def _rows(docs: pl.DataFrame, doc_ids: list) -> pl.DataFrame:
    """The rows of `docs` for `doc_ids`, in that order."""
    order = pl.DataFrame({"doc_id": doc_ids}, schema={"doc_id": docs.schema["doc_id"]})
    return order.join(docs, on="doc_id", how="left", maintain_order="left")


def _report_pages(storage: StorageResource, key: str) -> dict[str, str]:
    """The comparison's report files that exist, by suffix (`md`, `html`), with their text."""
    paths = {suffix: storage.reports_dir / f"{key}.{suffix}" for suffix in ("md", "html")}
    return {suffix: path.read_text(encoding="utf-8") for suffix, path in paths.items() if path.exists()}


def _write_causal_section(storage: StorageResource, key: str, summary: pl.DataFrame, n_controls: int) -> None:
    """Put the 'Causal evidence' section of `summary` (`effects.effect_summary`) into the comparison's
    report files that exist, replacing the one there; each feature named by its label in its side's
    dataset."""
    a, b = parse_comparison_key(key)
    base = storage.parquet_base
    labels: dict[int, str] = {}
    for direction, ds in (("a", a), ("b", b)):
        if table_exists(base, "feature_labels", ds):
            wanted = summary.filter(pl.col("direction") == direction)["feature"].unique().to_list()
            frame = read_table(base, "feature_labels", ds).filter(pl.col("feature").is_in(wanted)).collect()
            labels.update(dict(zip(frame["feature"].to_list(), frame["label"].to_list(), strict=True)))
    section = dict(name_a=a, name_b=b, labels=labels, n_controls=n_controls)
    renderers = {"md": reports.render_causal_markdown, "html": reports.render_causal_html}
    for suffix, page in _report_pages(storage, key).items():
        page = reports.with_causal_section(
            page, renderers[suffix](summary, **section), html_page=suffix == "html"
        )
        write_bytes_atomic(str(storage.reports_dir / f"{key}.{suffix}"), page.encode("utf-8"))


class CriterionEffectsConfig(Config):
    """Which criterion's features to ablate (a binary criterion of feature_associations) and how much."""

    criterion: str  # e.g. "escalated" or "topic=billing" (feature_associations' `criterion`)
    top_n: int = 3  # the criterion's significant features with the highest AUC
    documents_per_feature: int = 16
    unaffected_documents: int = 4
    reference_documents: int = 200  # besides the edited ones: their unedited embeddings fix the directions
    n_controls: int = 10
    n_boot: int = 1000
    seed: int = 0


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    group_name="analysis",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    metadata=column_schema("criterion_effects"),
    code_version=EFFECTS_CODE_VERSION,
    pool=MODEL_POOL,
    op_tags=MODEL_STEP_TAGS,
    deps=[AssetDep("feature_associations"), AssetDep("token_activations"), AssetDep("raw_documents")],
    description="Causal evidence for the features that go with one metadata criterion (launchpad: "
    "`criterion`, e.g. escalated or topic=billing): each is ablated inside the reader on documents where it "
    "fires, and the document embedding's shift along the criterion (mean embedding of documents where it "
    "holds minus where it does not, from unedited embeddings) and along the feature's signature is "
    "compared with frequency-matched random features and a placebo. On demand (in no job).",
)
def criterion_effects(
    context: AssetExecutionContext,
    config: CriterionEffectsConfig,
    sae_reader: SAEReaderResource,
    storage: StorageResource,
):
    dataset = context.partition_key
    base = storage.parquet_base
    if not table_exists(base, "feature_associations", dataset):
        raise FileNotFoundError(
            f"criterion_effects [{dataset}]: no feature_associations yet; materialize it for {dataset} first."
        )
    assoc = read_table(base, "feature_associations", dataset)
    rows = assoc.filter(pl.col("criterion") == config.criterion).collect()
    if rows.is_empty():
        known = sorted(assoc.select("criterion").unique().collect()["criterion"].to_list())
        raise ValueError(
            f"criterion_effects [{dataset}]: no criterion {config.criterion!r} in feature_associations; "
            f"choose one of {known} in the launchpad config."
        )
    if rows["statistic"][0] != "auc":
        raise ValueError(
            f"criterion_effects [{dataset}]: {config.criterion!r} is numeric ({rows['statistic'][0]}); "
            "choose a binary criterion (a boolean column or a `column=level` of a text column)."
        )
    top = (
        rows.filter(pl.col("significant") & (pl.col("effect") > 0.5))
        .sort(["q_value", "effect"], descending=[False, True])
        .head(config.top_n)
    )
    docs = stored_documents(storage, dataset)
    criteria, _ = metadata_criteria(docs, [rows["column"][0]])
    positive = str(rows["positive_class"][0]).lower()
    holds = dict(
        zip(
            criteria["doc_id"].to_list(),
            (criteria[config.criterion].cast(pl.String).str.to_lowercase() == positive).to_list(),
            strict=True,
        )
    )
    text_of = dict(docs.select("doc_id", "text").iter_rows())
    rng = np.random.default_rng(config.seed)
    targets = [int(f) for f in top["feature"].to_list()]
    fires = {f: _firing_documents(base, dataset, f) for f in targets}
    ids = docs["doc_id"].to_list()
    edited, used = {}, set()
    for f in targets:
        edited[f] = _edited_documents(ids, fires[f], config, rng)
        used |= set(edited[f])
    # Directions come from unedited embeddings: a sample of the documents plus every document edited.
    known = [d for d in ids if holds.get(d) is not None]
    reference = sorted(set(_sample(known, config.reference_documents, rng)) | used)
    reader = sae_reader.get_reader()
    with reader.forward_lock:
        emb = _reference_embeddings(storage, _rows(docs, reference), sae_reader)
        labelled = np.array([holds.get(d) is not None for d in reference])
        held = np.array([bool(holds.get(d)) for d in reference])
        try:
            along = effects.mean_difference_direction(
                emb[labelled & held], emb[labelled & ~held], seed=config.seed
            )
        except ValueError as exc:
            raise ValueError(
                f"criterion_effects [{dataset}]: {config.criterion!r} needs documents where it holds and "
                f"where it does not among the reference documents: {exc} Raise reference_documents."
            ) from exc
        plan = []
        for f in targets:
            fired = np.array([d in fires[f] for d in reference])
            try:
                signature = effects.mean_difference_direction(emb[fired], emb[~fired], seed=config.seed)
            except ValueError as exc:
                context.log.warning(f"criterion_effects [{dataset}]: feature {f} not measured: {exc}")
                continue
            texts = [text_of[d] for d in edited[f]]
            plan.append(effects.EffectTarget(f, "criterion", texts, signature, along))
        records = effects.feature_effects(
            reader,
            plan,
            n_controls=config.n_controls,
            n_boot=config.n_boot,
            seed=config.seed,
            direction_name="criterion_direction",
        )
    summary = effects.effect_summary(records)
    table = records.drop("direction").with_columns(
        pl.lit(dataset).alias("dataset"),
        pl.lit(config.criterion).alias("criterion"),
        pl.lit(along.held_out_auc).alias("criterion_auc"),
    )
    shown = summary.select("feature", "score_name", "documents", "effect", "controls_beyond", "evidence")
    return Output(
        table,
        metadata={
            "criterion": config.criterion,
            "features_measured": summary["feature"].n_unique(),
            "features_with_evidence": int(summary["evidence"].sum()),
            "criterion_direction_auc": along.held_out_auc,
            "effects": MetadataValue.md(markdown_preview(shown.to_arrow(), max_rows=shown.height)),
        },
    )
