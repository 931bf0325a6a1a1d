"""Refinement of CAMs into pseudo labels (IRN path index, random walk)."""
