"""Evaluation: generate or rank, ground to the catalogue, metrics, baselines, bootstrap CIs, comparisons."""
