"""Figures that let a reader judge a clustering (notebook 01_cluster): how sizes are spread, whether
clusters are separated on a 2-D UMAP map and how they line up with sources, and what each cluster
is about (top terms, documents nearest its centroid).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

# Categories beyond this count share one trace and get no legend (10,000 legend entries help nobody).
MAX_LEGEND_ENTRIES = 30
PALETTE = plotly.colors.qualitative.Dark24 + plotly.colors.qualitative.Light24


def cluster_size_figure(sizes: np.ndarray | Sequence[int]) -> go.Figure:
    """Histogram of documents per cluster; a long tail or many empty clusters signal a poor k."""
    sizes = np.asarray(sizes)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError(f"sizes must be a non-empty 1-D array of cluster sizes, got shape {sizes.shape}")
    fig = go.Figure(go.Histogram(x=sizes, marker_color=PALETTE[0], name="clusters"))
    fig.update_layout(
        title=(f"Cluster sizes: k={sizes.size}, median {np.median(sizes):g}, max {sizes.max()}, "
               f"empty {int((sizes == 0).sum())}"),
        xaxis_title="documents in the cluster", yaxis_title="clusters", bargap=0.05, showlegend=False)
    return fig


def umap_coordinates(vectors: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
                     metric: str = "cosine") -> np.ndarray:
    """2-D UMAP coordinates `[n, 2]` of `vectors` `[n, d]` (seeded, hence single-threaded and repeatable)."""
    import umap

    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) < 4:
        raise ValueError(f"UMAP needs a 2-D array of at least 4 vectors, got shape {vectors.shape}")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(vectors) - 1), min_dist=min_dist,
                        metric=metric, random_state=seed, n_jobs=1)  # a seed forces one job anyway
    return reducer.fit_transform(vectors)  # [n, 2]


def embedding_map_figure(coords: np.ndarray, colour_by: Sequence[object], title: str, legend_title: str,
                         hover_text: Sequence[str] | None = None) -> go.Figure:
    """Scatter of 2-D coordinates, one colour per category of `colour_by` (e.g. cluster or source)."""
    coords = np.asarray(coords)
    categories = pd.Series(np.asarray(colour_by)).astype(str)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(categories):
        raise ValueError(f"coords must be [n, 2] with one category per point, got {coords.shape} "
                         f"and {len(categories)} categories")
    hover = pd.Series(list(hover_text) if hover_text is not None else [""] * len(coords))
    names = sorted(categories.unique(), key=_natural_key)
    colour_of = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    fig = go.Figure()
    groups = [(name, (categories == name).to_numpy()) for name in names] if len(names) <= MAX_LEGEND_ENTRIES \
        else [(None, np.ones(len(coords), dtype=bool))]
    for name, mask in groups:
        fig.add_trace(go.Scattergl(
            x=coords[mask, 0], y=coords[mask, 1], mode="markers", name=name,
            marker={"size": 5, "color": [colour_of[c] for c in categories[mask]], "opacity": 0.8},
            customdata=np.stack([categories[mask], hover[mask]], axis=1),
            hovertemplate=f"{legend_title}: %{{customdata[0]}}<br>%{{customdata[1]}}<extra></extra>"))
    fig.update_layout(title=title, legend_title_text=legend_title, showlegend=len(names) <= MAX_LEGEND_ENTRIES,
                      xaxis={"visible": False}, yaxis={"visible": False})
    return fig


def umap_map_figures(vectors: np.ndarray, labels: Sequence[int], sources: Sequence[str] | None = None,
                     hover_text: Sequence[str] | None = None, seed: int = 0) -> list[go.Figure]:
    """One UMAP of a sample, drawn coloured by cluster and (when given) by source."""
    coords = umap_coordinates(vectors, seed=seed)  # [n, 2]
    figures = [embedding_map_figure(coords, labels, f"UMAP of {len(coords)} documents by cluster", "cluster",
                                    hover_text)]
    if sources is not None:
        figures.append(embedding_map_figure(coords, sources, f"UMAP of {len(coords)} documents by source",
                                            "source", hover_text))
    return figures


def largest_clusters(labels: Sequence[int], n: int) -> list[int]:
    """The `n` most populous clusters, largest first (ties by cluster id)."""
    counts = pd.Series(np.asarray(labels)).value_counts()
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [int(cluster) for cluster, _ in ordered[:n]]


def top_terms(texts: Sequence[str], labels: Sequence[int], n_terms: int = 8,
              clusters: Sequence[int] | None = None, max_features: int = 50_000) -> pd.DataFrame:
    """Terms that distinguish each cluster: TF-IDF with each cluster's members joined as one document
    (class-based TF-IDF, so a term common to every cluster scores low).

    Columns: cluster, size, top_terms. `clusters` defaults to the 20 largest.
    """
    from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer
    from sklearn.preprocessing import LabelEncoder

    labels = np.asarray(labels)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    vectorizer = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{2,}\b", max_features=max_features)
    try:
        counts = vectorizer.fit_transform(texts)  # [n_docs, V] sparse
    except ValueError as error:
        raise ValueError(f"no terms to rank in {len(texts)} texts (only stop words or digits?): {error}") from error
    encoder = LabelEncoder().fit(labels)
    members = _membership(encoder.transform(labels), len(encoder.classes_))  # [K, n_docs] sparse
    weights = TfidfTransformer(sublinear_tf=True).fit_transform(members @ counts).tocsr()  # [K, V]
    vocabulary = vectorizer.get_feature_names_out()
    sizes = pd.Series(labels).value_counts()
    rows = []
    for cluster in clusters if clusters is not None else largest_clusters(labels, 20):
        row = weights[int(encoder.transform([cluster])[0])].toarray()[0]  # [V]
        best = [i for i in np.argsort(-row, kind="stable")[:n_terms] if row[i] > 0]
        rows.append({"cluster": int(cluster), "size": int(sizes[cluster]),
                     "top_terms": ", ".join(vocabulary[i] for i in best)})
    return pd.DataFrame(rows, columns=["cluster", "size", "top_terms"])


def _membership(codes: np.ndarray, n_clusters: int):  # -> scipy.sparse.csr_matrix [K, n]
    from scipy.sparse import csr_matrix

    return csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_clusters, len(codes)))


def example_documents(texts: Sequence[str], labels: Sequence[int], ids: Sequence[str] | None = None,
                      distances: Sequence[float] | None = None, n_examples: int = 3,
                      clusters: Sequence[int] | None = None, max_chars: int = 200) -> pd.DataFrame:
    """The documents nearest each cluster's centroid (or its first ones when no distances are given).

    Columns: cluster, rank, id, distance, text (cut to `max_chars`). `clusters` defaults to the 20 largest.
    """
    frame = pd.DataFrame({"cluster": np.asarray(labels), "text": list(texts),
                          "id": list(ids) if ids is not None else [str(i) for i in range(len(texts))],
                          "distance": np.asarray(distances, dtype=float) if distances is not None else np.nan})
    chosen = list(clusters) if clusters is not None else largest_clusters(frame["cluster"], 20)
    frame = frame[frame["cluster"].isin(chosen)]
    if distances is not None:
        frame = frame.sort_values("distance", kind="stable")
    frame = frame.groupby("cluster", sort=False).head(n_examples).copy()
    frame["rank"] = frame.groupby("cluster").cumcount() + 1
    frame["text"] = frame["text"].map(lambda t: _shorten(t, max_chars))
    order = {cluster: i for i, cluster in enumerate(chosen)}
    frame = frame.sort_values(["cluster", "rank"], key=lambda col: col.map(order) if col.name == "cluster" else col)
    return frame[["cluster", "rank", "id", "distance", "text"]].reset_index(drop=True)


def table_figure(frame: pd.DataFrame, title: str) -> go.Figure:
    """A DataFrame as a plotly table (for top terms and example documents in an HTML report)."""
    cells = [frame[col].map(lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)) for col in frame.columns]
    fig = go.Figure(go.Table(header={"values": list(frame.columns), "align": "left"},
                             cells={"values": cells, "align": "left"}))
    fig.update_layout(title=title)
    return fig


def _shorten(text: str, max_chars: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


def _natural_key(name: str) -> tuple[int, int | str]:
    """Numeric categories (cluster ids) sort as numbers, others alphabetically."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)
