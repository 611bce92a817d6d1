"""Influence of pretraining documents on a reference loss (Quad, Sec. 3): estimators, projection, scorer."""
