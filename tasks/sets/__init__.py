"""Builders of the data sets evoforge ships (data/sets/README.md): each a `python -m` command that
rewrites the same bytes from the same seed. Not stages: nothing of a round imports them."""
