"""The grader pool a process shares: one pool per settings, reused by every stage and GRPO's reward,
its own in a forked child, still bounded by the hard deadline, and gone when the process exits."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from evoforge.data import home
from evoforge.tasks.finetune.grpo import VerifierReward
from evoforge.tasks.grading.pool import GraderPool, stop_shared_pools
from evoforge.tasks.verify import VerifyConfig, grade_each_answer_once, grade_pairs, verify
from tests.waiting import wait_until


def worker_pids(pool: GraderPool) -> list[int]:
    return [worker.process.pid for worker in pool.workers]


def a_round(problems: int = 3, samples: int = 4) -> tuple[pa.Table, pa.Table]:
    """Answers as square roots: an exact number (whole, or a fraction) is decided without a grader (`exact_gold_verdict`)."""
    rollouts = [dict(rollout_id=f"r{p}-{s}", problem_id=f"p{p}", text=f"so \\boxed{{\\sqrt{{{(p + s % 2) ** 2}}}}}")
                for p in range(problems) for s in range(samples)]
    golds = [dict(problem_id=f"p{p}", answer=str(p)) for p in range(problems)]
    return pa.Table.from_pylist(rollouts), pa.Table.from_pylist(golds)


@pytest.mark.unit
def test_every_stage_and_the_reward_in_a_process_grade_on_the_same_workers():
    config = VerifyConfig(workers=2, deadline_seconds=30)
    rollouts, golds = a_round()
    first = verify(rollouts, golds, config)
    pool = config.pool()
    pids = worker_pids(pool)
    assert len(pids) == 2 and all(worker.process.is_alive() for worker in pool.workers)  # leaving the stage kept them
    second = verify(rollouts, golds, config)
    with config.pool() as reward_pool:  # as GRPO's trainer holds it
        rewards = VerifierReward(reward_pool)(prompts=[None] * 2, completions=["\\boxed{\\sqrt{1}}", "\\boxed{\\sqrt{4}}"],
                                              answer=["1", "1"])
    assert config.pool() is pool is reward_pool and worker_pids(pool) == pids
    verdicts = ["rollout_id", "verdict", "extracted_answer", "detail", "graded_with"]
    assert first.select(verdicts).to_pylist() == second.select(verdicts).to_pylist() and rewards == [1.0, 0.0]
    assert first["verdict"].to_pylist().count("correct") == 6
    # other settings are another pool: a different deadline can change which items time out
    assert VerifyConfig(workers=2, deadline_seconds=29).pool() is not pool


@pytest.mark.unit
def test_a_group_that_agrees_is_graded_once_with_the_verdicts_of_grading_every_sample():
    pairs = [("4", "so \\boxed{4}"), ("4", "I get \\boxed{4}"), ("4", "\\boxed{5}"), ("4", "no box"),
             ("4", "none either"), ("7", "\\boxed{4}"), ("4", "\\boxed{2} then \\boxed{4}")]
    config = VerifyConfig(workers=1, deadline_seconds=30)
    once = grade_each_answer_once(config.pool(), pairs)
    each = grade_pairs(pairs, config)
    assert [r[:3] for r in once] == [r[:3] for r in each]
    assert once[0] is once[1] and once[3] is once[4]  # one grading, shared
    assert once[5] is not once[0] and once[6] is not once[0]  # another gold, other boxes: graded apart


def _grade_in_child(pool: GraderPool, config: VerifyConfig, out) -> None:
    inherited = pool.run([("grade", "3", "\\boxed{3}")])[0][0]  # the parent's pool object, used here
    own = config.pool()
    own.run([("grade", "4", "\\boxed{4}")])
    out.put({"inherited": inherited, "inherited_pids": worker_pids(pool), "own_pids": worker_pids(own)})
    stop_shared_pools()
    out.close()
    out.join_thread()
    # A bare fork of the test process inherits the at-exit hooks of whatever ran before in it: after a
    # Prefect flow, Prefect's service drain fails an assertion in a forked child (exit code 1). The
    # child's exit code stands for the pool's work only when it skips them.
    os._exit(0)


@pytest.mark.slow
def test_a_forked_child_grades_on_its_own_workers_and_leaves_the_parents_alone():
    config = VerifyConfig(workers=2, deadline_seconds=30)
    pool = config.pool()
    assert pool.run([("grade", "1", "\\boxed{1}")])[0][0] == "correct"
    parent_pids = worker_pids(pool)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_grade_in_child, args=(pool, config, out))
    child.start()
    seen = out.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert seen["inherited"] == "correct"
    # the pool object it inherited started the child's own workers, and they are the child's shared pool
    assert seen["own_pids"] == seen["inherited_pids"] and not set(seen["own_pids"]) & set(parent_pids)
    # the parent's workers were neither used nor stopped by the child
    assert pool.run([("grade", "2", "\\boxed{3}")])[0][0] == "wrong" and worker_pids(pool) == parent_pids


@pytest.mark.slow
def test_a_timeout_on_the_shared_pool_ends_at_the_deadline_and_the_pool_grades_on():
    config = VerifyConfig(workers=2, deadline_seconds=2.0)
    pool = config.pool()
    restarts = pool.restarts
    results = grade_pairs([("5", "\\boxed{123456789^{123456789}}"), ("4", "\\boxed{4}")], config)
    assert results[0][0] == "timeout"
    assert results[0][3] < 2.0 + 1.5  # killed at the deadline, not later
    assert results[1][0] == "correct"
    assert pool.restarts > restarts and config.pool() is pool
    after = grade_pairs([("7", "\\boxed{7}"), ("7", "\\boxed{8}")], config)  # the replacement grades
    assert [r[0] for r in after] == ["correct", "wrong"]


@pytest.mark.slow
def test_a_worker_killed_while_the_pool_was_idle_is_replaced_at_the_next_run():
    config = VerifyConfig(workers=2, deadline_seconds=30)
    pool = config.pool()
    grade_pairs([("1", "\\boxed{1}")], config)
    victim = pool.workers[0].process
    victim.kill()
    victim.join()
    assert [r[0] for r in grade_pairs([("1", "\\boxed{1}"), ("2", "\\boxed{3}")], config)] == ["correct", "wrong"]
    assert victim.pid not in worker_pids(pool)


GRADE_AND_EXIT = """
import os, sys
from evoforge.tasks.verify import VerifyConfig, grade_pairs
marker = sys.argv[1]

def graders():  # this script's forkserver and workers: their command line carries the marker in sys.path
    found = []
    for entry in os.listdir('/proc'):
        try:
            if entry.isdigit() and int(entry) != os.getpid() and marker in open(f'/proc/{entry}/cmdline').read():
                found.append(int(entry))
        except OSError:
            pass
    return found

if sys.argv[2] == 'graded':
    print(grade_pairs([('1', '\\\\boxed{1}'), ('2', '\\\\boxed{2}')], VerifyConfig(workers=2))[0][0], len(graders()))
else:  # exits while the pool is still starting
    VerifyConfig(workers=2).pool()
    print('warming')
"""


def live_graders(marker: str) -> list[int]:
    """Processes whose command line carries `marker`, zombies aside (nothing may reap them here)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker in Path(f"/proc/{entry}/cmdline").read_text():
                if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry))
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("when", ["graded", "warming"])
def test_exit_leaves_no_grader_process_behind(scratch, when):
    marker = str(scratch / "grader-marker")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([marker, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", GRADE_AND_EXIT, marker, when], cwd=home.PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if when == "graded":
        verdict, graders = done.stdout.split()
        assert verdict == "correct" and int(graders) >= 3  # the forkserver and two workers were there
    wait_until("the grader processes to exit", lambda: not live_graders(marker), timeout=30,
               explain=lambda: f"still running: {live_graders(marker)}")


@pytest.mark.unit
def test_a_workers_start_up_is_not_an_items_time():
    """Before the chunk's first item begins, its clock runs from sending it or from the worker being
    ready, whichever is later; a worker still starting is on no item's clock."""
    from multiprocessing.sharedctypes import RawArray

    from evoforge.tasks.grading.pool import _Worker

    state = RawArray("d", 3)  # position, item started, worker ready: what a worker publishes
    worker = _Worker(process=None, conn=None, state=state, started_at=100.0, chunk=[0, 1], sent_at=100.5)
    assert worker.clock()[1] is None and not worker.overdue(1000.0, 10.0)  # still starting
    state[2] = 103.0
    assert worker.clock()[1] == 103.0 and not worker.overdue(112.0, 10.0) and worker.overdue(113.5, 10.0)
    state[1] = 104.0
    assert worker.clock()[1] == 104.0
