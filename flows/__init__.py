"""Prefect: the stage registry, the round config, one flow per stage, the round and evolve flows, and
the one input layer over the lake (docs/ARCHITECTURE.md, "Layers")."""
# Flows run in processes evoforge did not start (a Prefect worker, a served deployment's flow run): point
# every library's writes into the project before they are imported (see data/home.py).
from evoforge.data import home as _home

_home.configure()

# Prefect's temporary server (no PREFECT_API_URL) must not outlive a process killed outright (flows/temporary_server.py)
from evoforge.flows.temporary_server import install as _make_the_temporary_server_die_with_us

_make_the_temporary_server_die_with_us()
