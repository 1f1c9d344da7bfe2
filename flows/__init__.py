"""Prefect: the stage registry, the round config, one flow per stage, the round and evolve flows, and
the one input layer over the lake (docs/ARCHITECTURE.md, "Layers")."""
# Flows run in processes evoforge did not start (a Prefect worker, a served deployment's flow run): point
# every library's writes into the project before they are imported (see data/home.py).
from evoforge.data import home as _home

_home.configure()
