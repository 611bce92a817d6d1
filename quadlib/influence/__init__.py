"""Influence of pretraining documents on a reference loss: estimators and the scorer."""
