"""Imported by the grader pool's forkserver before it forks any worker (see tasks/grading/pool.py)."""
from evoforge.tasks.grading.answers import warm_up

warm_up()
