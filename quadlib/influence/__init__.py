"""Influence of pretraining documents on a reference loss: estimators, projection, scorer."""
