"""Imported by the grader pool's forkserver before it forks any worker (see tasks/grader_pool.py)."""
from evoforge.tasks.grading import warm_up

warm_up()
