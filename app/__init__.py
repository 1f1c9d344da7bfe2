"""The application around the stages: the one command line (`evoforge`), the Prefect server and its
database, the PostgreSQL evoforge runs for it, the cluster's work pools and workers. It calls into
flows/ (and, for commands that are not rounds, tasks/ and models/); nothing below imports it.
docs/ARCHITECTURE.md has the whole layout."""
