"""Imported by the grader pool's forkserver before it forks any worker (see tasks/grading/pool.py):
math-verify and sympy imported and warmed, and the pool module a worker unpickles its target from."""
import evoforge.tasks.grading.pool  # noqa: F401
from evoforge.tasks.grading.answers import warm_up

warm_up()
