# Flows run in processes evoforge did not start (a Prefect worker, a served deployment's flow run): point
# every library's writes into the project before they are imported (see data/home.py).
from evoforge.data import home as _home

_home.configure()
