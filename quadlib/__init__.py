"""Quad Workbench: pretraining data selection by influence and diversity (Quad, ICLR 2025)."""

__version__ = "0.1.0"
