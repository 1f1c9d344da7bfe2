# The two commands of README.md. Each first creates or refreshes the environment (idempotent).
.PHONY: env demo test bench

env:
	@bash deploy/setup.sh

demo: env
	.venv/bin/evoforge demo

test: env
	.venv/bin/python -m pytest

bench: env
	.venv/bin/python bench/verify_throughput.py
	.venv/bin/python bench/generate_throughput.py
