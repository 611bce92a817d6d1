"""Default data: deterministic, multi-domain, and the committed files match the generator."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quadlib.synthetic import DOMAINS, REFERENCE_DOMAINS, SyntheticSettings, generate, write_default_data

DATA = Path(__file__).resolve().parents[1] / "data" / "synthetic"


def test_generate_is_seeded_and_multi_domain() -> None:
    pool, ref = generate(SyntheticSettings(docs_per_domain=20, reference_docs=10))
    again, _ = generate(SyntheticSettings(docs_per_domain=20, reference_docs=10))
    assert pool == again
    assert Counter(r["source"] for r in pool) == {d.name: 20 for d in DOMAINS}
    other, _ = generate(SyntheticSettings(docs_per_domain=20, reference_docs=10, seed=1))
    assert other != pool
    assert len(ref) == 10 and len({r["id"] for r in pool}) == len(pool)


def test_reference_is_closer_to_its_domains() -> None:
    pool, ref = generate(SyntheticSettings(docs_per_domain=50, reference_docs=40))
    ref_vocab = Counter(w for r in ref for w in r["text"].lower().split())
    overlap = {}
    for domain in DOMAINS:
        words = [w for r in pool if r["source"] == domain.name for w in r["text"].lower().split()]
        overlap[domain.name] = sum(1 for w in words if w in ref_vocab) / len(words)
    near = min(overlap[d] for d in REFERENCE_DOMAINS)
    far = max(v for k, v in overlap.items() if k not in REFERENCE_DOMAINS)
    assert near > far + 0.1, overlap


def test_committed_default_data_is_reproducible(tmp_path: Path) -> None:
    pool_path, ref_path = write_default_data(tmp_path)
    assert pool_path.read_bytes() == (DATA / "pool.jsonl.gz").read_bytes()
    assert ref_path.read_bytes() == (DATA / "reference.jsonl.gz").read_bytes()
