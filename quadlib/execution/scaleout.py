"""The per-shard part of the pipeline on one executor: embed -> centroids -> assign -> scores.

    python -m quadlib.execution.scaleout --run runs/big --executor ray --ray-address auto \\
        --steps embed assign dsir influence --proxy-dir runs/big/proxy/model \\
        --estimator-state runs/big/influence/<estimator>-<id>/estimator.safetensors

The corpus must be ingested first (`quadlib.corpus.ingest`, one shard per unit of parallel work).
Centroids are fitted on the driver on a seeded sample of the embeddings (the sample
`quadlib.cluster.cluster_corpus` draws, so the centroids are the same) and broadcast to the assign
workers; at 600M documents the driver never holds more than that sample. The assigned shards are then
gathered into `<run>/cluster/`, the files `cluster_corpus` writes, which every reader of the clustering
uses. Every step resumes from its finished shards, with either executor.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quadlib.cluster import (ClusterSettings, clustering_params, fit_sample_centroids, load_quality, save_centroids,
                             write_clustering)
from quadlib.embed import EmbedSettings, embedding_shards
from quadlib.execution.executors import ExecutorSettings, StepRun, make_executor
from quadlib.execution.step import ShardStep, read_step_output
from quadlib.execution.steps import AssignStep, DsirFeatureStep, EmbedStep, InfluenceStep, PerplexityStep
from quadlib.runstore import RunStore
from quadlib.settings import add_options, setting, settings_from_options

CENTROIDS_STEP = "cluster-centroids"


@dataclass
class ScaleOutSettings:
    """Which per-shard steps run where, and the settings of each (`quad scale`)."""

    steps: list[str] = setting(["embed", "assign"], "per-shard steps to run, in pipeline order: keys of "
                               "SCALEOUT_STEPS (embed, assign, dsir, perplexity, influence)")
    executor: ExecutorSettings = field(default_factory=ExecutorSettings,
                                       metadata={"help": "local or ray, and the Ray cluster", "flatten": True})
    embed: EmbedSettings = field(default_factory=EmbedSettings, metadata={"help": "embedding model and length cap"})
    cluster: ClusterSettings = field(default_factory=ClusterSettings,
                                     metadata={"help": "k, algorithm, fit sample size and seed of the centroids"})
    proxy_dir: str | None = setting(None, "saved proxy (`<run>/proxy/model`) for the perplexity and influence steps")
    estimator_state: str | None = setting(None, "fitted estimator (safetensors written by quadlib.pipeline.prepare_scorer)")
    estimator: str = setting("kfac_joint_qkv", "the estimator that wrote estimator_state")
    max_length: int = setting(128, "tokens per document for the proxy steps")


def fit_pool_centroids(store: RunStore, settings: ClusterSettings, embed_step: str = "embed") -> np.ndarray:
    """Centroids `[k, d]` fitted on `cluster_corpus`'s seeded sample (`quadlib.cluster.fit_sample_centroids`);
    stored once, reused on reruns."""
    path = store.step_dir(CENTROIDS_STEP) / "centroids.npy"
    shards = embedding_shards(store, embed_step)
    if store.begin(CENTROIDS_STEP, clustering_params(store, settings, shards, embed_step), seed=settings.seed):
        return np.load(path)
    centroids, fit_info = fit_sample_centroids(shards, settings)  # [k, d]
    save_centroids(store, CENTROIDS_STEP, centroids, fit_info)
    store.mark_done(CENTROIDS_STEP, info=fit_info)
    return centroids


def publish_clustering(store: RunStore, settings: ClusterSettings, run: StepRun | None = None,
                       embed_step: str = "embed", out_step: str = "cluster") -> dict:
    """Gather the assign step's shards into `<run>/cluster/` (assignments.parquet, centroids.npy,
    sizes.parquet, quality.json), the files `quadlib.cluster.cluster_corpus` writes, under the same
    parameters: every reader (`load_assignments`, notebook 03, `quad select`) finds one path, and
    `cluster_corpus` with the same settings reuses it. Returns the quality figures."""
    shards = embedding_shards(store, embed_step)
    with store.lock(out_step):
        if store.begin(out_step, clustering_params(store, settings, shards, embed_step), seed=settings.seed):
            return load_quality(store, out_step)
        centroids = np.load(store.root / CENTROIDS_STEP / "centroids.npy")  # [k, d]
        save_centroids(store, out_step, centroids, store.done_info(CENTROIDS_STEP, "centroids"))
        frame = read_step_output(store, AssignStep(centroids, spherical=settings.spherical, embed_step=embed_step))
        ids = [doc_id for shard in shards for doc_id in shard.ids]
        if frame["id"].tolist() != ids:
            raise ValueError(f"{store.root / 'cluster-assign'}: the assigned ids differ from the embedded ids of "
                             f"{store.root / embed_step}; re-run the scale-out's assign step")
        seconds = sum(r.seconds for r in run.processed) if run is not None else 0.0  # worker-seconds of this run
        return write_clustering(store, settings, shards, frame["cluster"].to_numpy(), frame["distance"].to_numpy(),
                                seconds, out_step)


def _proxy_dir(settings: ScaleOutSettings, step: str) -> str:
    if settings.proxy_dir is None:
        raise ValueError(f"step {step!r} needs the proxy model: set proxy_dir (--proxy <run>/proxy/model)")
    return settings.proxy_dir


def _influence_step(store: RunStore, settings: ScaleOutSettings) -> ShardStep:
    if settings.estimator_state is None:
        raise ValueError("the influence step needs estimator_state (--estimator-state .../estimator.safetensors)")
    return InfluenceStep(_proxy_dir(settings, "influence"), settings.estimator_state, estimator=settings.estimator,
                         max_length=settings.max_length)


StepFactory = Callable[[RunStore, ScaleOutSettings], ShardStep]

# A new per-shard step for the command line is one entry here.
SCALEOUT_STEPS: dict[str, StepFactory] = {
    "embed": lambda store, s: EmbedStep(s.embed),
    "assign": lambda store, s: AssignStep(fit_pool_centroids(store, s.cluster), spherical=s.cluster.spherical,
                                          chunk_size=s.cluster.chunk_size, device=s.cluster.device),
    "dsir": lambda store, s: DsirFeatureStep(),
    "perplexity": lambda store, s: PerplexityStep(_proxy_dir(s, "perplexity"), max_length=s.max_length),
    "influence": _influence_step,
}


def run_scaleout(store: RunStore, settings: ScaleOutSettings) -> dict[str, StepRun]:
    """Run the configured per-shard steps in order on the configured executor; returns each step's run."""
    unknown = [s for s in settings.steps if s not in SCALEOUT_STEPS]
    if unknown:
        raise ValueError(f"unknown scale-out step(s) {unknown}; known: {sorted(SCALEOUT_STEPS)}")
    executor = make_executor(settings.executor)
    runs = {}
    for name in settings.steps:
        runs[name] = executor.run(SCALEOUT_STEPS[name](store, settings), store)
        if name == "assign":  # the readers' one path: <run>/cluster/, as cluster_corpus writes it
            publish_clustering(store, settings.cluster, runs[name])
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out options, generated from `ScaleOutSettings` (`quadlib.settings.add_options`): `--steps`,
    `--executor`, `--ray-*`, `--embed-*`, `--cluster-*`, `--proxy-dir`, `--estimator-state` ..."""
    parser.add_argument("--run", required=True, help="run folder holding an ingested corpus/")
    add_options(parser, ScaleOutSettings, title="scale-out")


def settings_from_args(args: argparse.Namespace) -> ScaleOutSettings:
    return settings_from_options(ScaleOutSettings, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quadlib.execution.scaleout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    for name, run in run_scaleout(RunStore(Path(args.run)), settings_from_args(args)).items():
        print(f"{name}: {len(run.processed)} shards processed ({run.rows} documents), {run.skipped} already done")


if __name__ == "__main__":
    main()
