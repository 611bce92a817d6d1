"""The Ray executor on a local 2-CPU Ray: same artifacts as the local executor, any worker count,
exactly-once output after a killed worker or a killed driver, and the bandit scored on actors."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: `make test` installs ray[data] from pyproject.toml")
pytestmark = pytest.mark.ray

import executor_steps  # noqa: E402
from executor_steps import (TINY_SELECT, CrashOnceScorer, CrashOnceStep, SlowStep, assert_exactly_once, ingest_tiny_run,  # noqa: E402
                            make_corpus, run_killed_driver, vowel_share_scorer)

from quadlib.cluster import ClusterSettings, fit_centroids  # noqa: E402
from quadlib.corpus import read_corpus  # noqa: E402
from quadlib.embed import EmbedSettings, load_embeddings  # noqa: E402
from quadlib.execution import LocalExecutor, RayExecutor, RaySettings, connect_ray, read_step_output  # noqa: E402
from quadlib.execution.doc_scorer import RayTextScorer, ray_doc_scorer  # noqa: E402
from quadlib.execution.steps import AssignStep, DsirFeatureStep, EmbedStep  # noqa: E402
from quadlib.runstore import RunStore  # noqa: E402
from quadlib.selection.bandit import BanditSettings, run_bandit  # noqa: E402
from quadlib.selection.scoring import CachingScorer  # noqa: E402


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """One local Ray (2 CPUs) for the whole module; its files in a short temp dir (socket path limits)."""
    tmp = Path(tempfile.mkdtemp(prefix="qray-"))
    connect_ray(RaySettings(num_cpus=2, tmp_dir=str(tmp)), tmp)
    ray.cloudpickle.register_pickle_by_value(executor_steps)  # test-only steps travel by value
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _ray(workers: int) -> RayExecutor:
    return RayExecutor(RaySettings(num_workers=workers))


def test_ray_gives_the_local_executors_embeddings_and_assignments(ray_address: str, tmp_path: Path) -> None:
    local, remote = RunStore(tmp_path / "local"), RunStore(tmp_path / "ray")
    for store in (local, remote):
        make_corpus(store, tmp_path, n_docs=40, shard_size=10)
    embed = EmbedStep(EmbedSettings(max_seq_length=32))
    LocalExecutor().run(embed, local)
    assert len(_ray(1).run(embed, remote).processed) == 4  # one actor: one model load on 2 shared cores
    ids, local_vectors = load_embeddings(local)  # quadlib.embed reads what either executor wrote
    ray_ids, ray_vectors = load_embeddings(remote)
    assert ray_ids == ids and np.abs(ray_vectors - local_vectors).max() < 1e-5

    centroids = fit_centroids(local_vectors, ClusterSettings(k=4, n_iter=5, seed=0))
    assign = AssignStep(centroids)
    LocalExecutor().run(assign, local)
    _ray(2).run(assign, remote)
    local_labels, ray_labels = read_step_output(local, assign), read_step_output(remote, assign)
    assert ray_labels["id"].tolist() == ids and ray_labels["cluster"].tolist() == local_labels["cluster"].tolist()
    assert local_labels["cluster"].nunique() > 1


def test_outputs_do_not_depend_on_worker_count_or_executor(ray_address: str, tmp_path: Path) -> None:
    step = DsirFeatureStep(num_buckets=512)
    outputs = {}
    for name, executor in (("local", LocalExecutor()), ("ray1", _ray(1)), ("ray2", _ray(2))):
        store = RunStore(tmp_path / name)
        make_corpus(store, tmp_path, n_docs=40, shard_size=5)
        executor.run(step, store)
        outputs[name] = [p.read_bytes() for p in store.shards(step.name)]
    assert len(outputs["local"]) == 8 and outputs["ray1"] == outputs["local"] and outputs["ray2"] == outputs["local"]

    # a run started locally is finished on Ray: only the unfinished shards are computed
    store = RunStore(tmp_path / "local")
    for shard in ("shard-00002", "shard-00005"):
        (store.root / step.name / "_done" / f"{shard}.json").unlink()
    (store.root / step.name / "_done" / "_step.json").unlink()
    finished = _ray(2).run(step, store)
    assert [r.shard for r in finished.processed] == ["shard-00002", "shard-00005"] and finished.skipped == 6
    assert [p.read_bytes() for p in store.shards(step.name)] == outputs["local"]


def test_a_killed_worker_is_retried_and_every_document_is_written_once(ray_address: str, tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    make_corpus(store, tmp_path, n_docs=40, shard_size=10)
    marker = tmp_path / "crashed"
    step = CrashOnceStep(marker, victim="doc-013")
    run = _ray(1).run(step, store)  # the only actor dies: Ray must restart it and retry the shard
    assert marker.exists(), "the worker never crashed: the test exercised nothing"
    assert sorted(r.shard for r in run.processed) == [f"shard-0000{i}" for i in range(4)]
    assert_exactly_once(store, step)


def test_a_killed_ray_driver_resumes_from_finished_shards(ray_address: str, tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    make_corpus(store, tmp_path, n_docs=32, shard_size=4)
    done = run_killed_driver(store, "ray", ray_address, at_least=2)
    assert 2 <= done and not store.is_done("dsir-slow")
    resumed = _ray(2).run(SlowStep(seconds=0.0), store)
    assert resumed.skipped >= done and resumed.skipped + len(resumed.processed) == 8
    assert_exactly_once(store, SlowStep())


def _local_bandit(tmp_path: Path):
    """A 40-document pool in 4 clusters, its texts and token counts, bandit settings, and the local selection."""
    store = RunStore(tmp_path / "run")
    make_corpus(store, tmp_path, n_docs=40, shard_size=10)
    pool = read_corpus(store)
    assignments = pd.DataFrame({"id": pool["id"], "cluster": np.arange(len(pool)) % 4})
    texts, n_tokens = dict(zip(pool["id"], pool["text"])), dict(zip(pool["id"], pool["n_tokens"]))
    settings = BanditSettings(k=2, batch_size=4, gamma=0.5, tau=0.0, budget_tokens=120, alpha=0.01)
    local = run_bandit(pool, assignments, CachingScorer(vowel_share_scorer(), texts, n_tokens,
                                                        tmp_path / "local.parquet"), settings, progress=False)
    return pool, assignments, texts, n_tokens, settings, local


def test_bandit_on_ray_actors_selects_what_the_local_bandit_selects(ray_address: str, tmp_path: Path) -> None:
    pool, assignments, texts, n_tokens, settings, local = _local_bandit(tmp_path)
    selections = []
    for workers in (1, 2):
        scorer = ray_doc_scorer(vowel_share_scorer, texts, n_tokens, tmp_path / f"ray{workers}.parquet",
                                RaySettings(num_workers=workers), chunk_size=3)
        selections.append(run_bandit(pool, assignments, scorer, settings, progress=False))
        assert isinstance(scorer.score_texts, RayTextScorer) and len(scorer.score_texts.actors) == workers
        scorer.score_texts.close()
    assert len(local.ids) > 2 and local.stop_reason
    for result in selections:
        assert result.ids == local.ids and np.array_equal(result.scores, local.scores)
        assert result.cost.docs_scored == local.cost.docs_scored


def test_a_killed_scoring_actor_loses_no_score(ray_address: str, tmp_path: Path) -> None:
    """The bandit's only scoring actor dies in its first round: Ray restarts it and retries the chunk,
    and the selection is the local one."""
    pool, assignments, texts, n_tokens, settings, local = _local_bandit(tmp_path)
    marker = tmp_path / "actor-died"
    scorer = ray_doc_scorer(CrashOnceScorer(marker), texts, n_tokens, tmp_path / "ray.parquet",
                            RaySettings(num_workers=1), chunk_size=3)
    result = run_bandit(pool, assignments, scorer, settings, progress=False)
    scorer.score_texts.close()
    assert marker.exists(), "the actor never died: the test exercised nothing"
    assert result.ids == local.ids and np.array_equal(result.scores, local.scores)


def test_quad_select_on_ray_equals_the_local_selection(ray_address: str, tmp_path: Path) -> None:
    """`quad select --executor ray` scores the bandit's rounds on actors and selects exactly what the
    local path selects, from a run folder made by `quad ingest` alone (everything else fitted)."""
    from quadlib.cli import main
    from quadlib.selection import read_selection

    local = RunStore(tmp_path / "local")
    ingest_tiny_run(local)
    main(["select", "--run", str(local.root), *TINY_SELECT])
    assert local.is_done("cluster") and local.is_done("proxy")  # fitted by `quad select`

    # the same run before its selections and scores: the Ray actors must compute every score
    shutil.copytree(local.root, tmp_path / "run-on-ray",
                    ignore=shutil.ignore_patterns("select-*", "selections", "scores.parquet*"))
    remote = RunStore(tmp_path / "run-on-ray")
    main(["select", "--run", str(remote.root), *TINY_SELECT, "--executor", "ray", "--ray-num-workers", "2"])

    from quadlib.influence.cache import ScoreCache

    (local_dir,), (ray_dir,) = (sorted(s.root.glob("influence/*/estimator.safetensors")) for s in (local, remote))
    ids = read_corpus(local)["id"].astype(str).tolist()
    local_scores = ScoreCache(local_dir.parent / "scores.parquet").get(ids)
    ray_scores = ScoreCache(ray_dir.parent / "scores.parquet").get(ids)
    assert len(ray_scores) >= 8, "the Ray actors scored nothing: the test exercised nothing"
    assert ray_scores == local_scores  # the same documents, bit-identical scores
    for method in ("random", "quad"):
        (ours, manifest), (theirs, _) = read_selection(remote, method), read_selection(local, method)
        assert ours["id"].tolist() == theirs["id"].tolist() and len(ours) > 2, method
    assert manifest["extra"]["n_rounds"] > 1
