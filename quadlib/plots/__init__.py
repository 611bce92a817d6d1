"""Plotly figure functions for the notebooks: pure functions from arrays/DataFrames to figures."""
