"""Grading answers, shared by verify, synthesize, mcts, evaluate and GRPO's reward: math-verify on one
(gold, answer) pair (answers.py), the pool of grader processes that bounds each with a deadline
(pool.py, preload.py), and the same pool as Ray actors (on_ray.py)."""
