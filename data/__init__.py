"""Data: downloads, Wikipedia extraction, pre-training preprocessing (Parquet / HDF5), loaders, task readers."""
