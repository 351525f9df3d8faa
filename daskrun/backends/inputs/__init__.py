"""Input back ends: files, delimited tables, Parquet, partitioned data sets
and Dask collections, each planned into mini-batches and read on workers."""
