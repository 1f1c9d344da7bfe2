"""evoforge: a data factory for self-evolving reasoning models.

The project's folders are the subpackages (pyproject.toml maps them under one import name, so
`evoforge.data` never collides with a user's own `data` package):

    evoforge.data    storage: schemas, ids and content hashes, the Parquet lake, the DuckDB catalog
    evoforge.models  engines, prompts, the model registry and the sandbox for model-written code
    evoforge.tasks   the stages, each a function over Arrow tables
    evoforge.flows   Prefect flows that wire the stages to storage, the stage registry, the round config
    evoforge.app     the command line, the Prefect server and its database, work pools and workers

docs/ARCHITECTURE.md has the whole layout.
"""
__version__ = "0.1.0"
