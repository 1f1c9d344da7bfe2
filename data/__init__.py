"""Storage: Arrow schemas, ids and hashes, the Parquet lake and its manifests, the DuckDB catalog, locks,
the home settings (docs/ARCHITECTURE.md, "Layers"). Imports nothing else of evoforge."""
