"""Synthetic data: prompt sources, the generate stage, quality filters, the Parquet schema."""
