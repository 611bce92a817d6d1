"""Cluster figures build from plain arrays and show what they claim."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from cluster_fixtures import blobs
from quadlib.plots.cluster_plots import (MAX_LEGEND_ENTRIES, cluster_size_figure, embedding_map_figure,
                                         example_documents, largest_clusters, table_figure, top_terms,
                                         umap_coordinates, umap_map_figures)

CAT_DOCS = ["the cat purrs on the sofa", "a cat chases mice", "my cat sleeps all day", "cats and kittens purr"]
STOCK_DOCS = ["stocks fell as markets slumped", "investors sold shares and stocks", "the stock market rallied"]
TEXTS = CAT_DOCS + STOCK_DOCS
LABELS = [5] * len(CAT_DOCS) + [2] * len(STOCK_DOCS)


def test_size_figure_summarises_sizes() -> None:
    fig = cluster_size_figure(np.array([3, 0, 7, 2]))
    assert isinstance(fig, go.Figure)
    assert list(fig.data[0].x) == [3, 0, 7, 2]
    assert "k=4" in fig.layout.title.text and "empty 1" in fig.layout.title.text
    with pytest.raises(ValueError, match="non-empty 1-D"):
        cluster_size_figure(np.array([]))


def test_umap_map_is_seeded_and_coloured_by_cluster_and_source() -> None:
    x, truth = blobs(n_per_blob=10, n_blobs=3, dim=16, seed=0)
    coords = umap_coordinates(x, seed=1)
    assert coords.shape == (30, 2)
    figures = umap_map_figures(x, truth, sources=[f"s{t}" for t in truth], seed=1)
    assert len(figures) == 2
    np.testing.assert_allclose(figures[0].data[1].x, coords[truth == 1, 0])  # same seed, same map
    assert [trace.name for trace in figures[0].data] == ["0", "1", "2"]
    assert [trace.name for trace in figures[1].data] == ["s0", "s1", "s2"]
    assert sum(len(trace.x) for trace in figures[1].data) == 30
    with pytest.raises(ValueError, match="at least 4 vectors"):
        umap_coordinates(x[:3])


def test_many_clusters_share_one_trace_without_legend() -> None:
    n = MAX_LEGEND_ENTRIES + 5
    fig = embedding_map_figure(np.random.default_rng(0).normal(size=(n, 2)), list(range(n)), "map", "cluster")
    assert len(fig.data) == 1 and fig.layout.showlegend is False
    assert len(set(fig.data[0].marker.color)) > 1
    with pytest.raises(ValueError, match="one category per point"):
        embedding_map_figure(np.zeros((3, 2)), [1, 2], "map", "cluster")


def test_top_terms_name_each_cluster_topic() -> None:
    terms = top_terms(TEXTS, LABELS, n_terms=3)
    assert terms["cluster"].tolist() == [5, 2]  # largest first
    assert terms["size"].tolist() == [4, 3]
    assert "cat" in terms.loc[0, "top_terms"] and "stocks" in terms.loc[1, "top_terms"]
    assert "stock" not in terms.loc[0, "top_terms"]
    with pytest.raises(ValueError, match="7 texts but 2 labels"):
        top_terms(TEXTS, [0, 1])


def test_example_documents_are_nearest_the_centroid() -> None:
    distances = [0.4, 0.1, 0.3, 0.2, 0.5, 0.05, 0.9]
    table = example_documents(TEXTS, LABELS, ids=[f"d{i}" for i in range(7)], distances=distances,
                              n_examples=2, max_chars=12)
    assert table["cluster"].tolist() == [5, 5, 2, 2]
    assert table["id"].tolist() == ["d1", "d3", "d5", "d4"]
    assert table["rank"].tolist() == [1, 2, 1, 2]
    assert all(len(t) <= 12 for t in table["text"]) and table.loc[0, "text"].endswith("…")
    assert largest_clusters(LABELS, 1) == [5]
    fig = table_figure(table, "examples")
    assert list(fig.data[0].header.values) == ["cluster", "rank", "id", "distance", "text"]
    assert fig.data[0].cells.values[3][0] == "0.100"
