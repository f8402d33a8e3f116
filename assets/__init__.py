"""Thin Dagster adapters over the libraries, one module per stage (checks beside each asset)."""
