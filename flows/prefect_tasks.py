"""The stage functions of tasks/ as Prefect tasks: the one place that wraps them.

A stage in tasks/ is a plain function over Arrow tables, so tests, benches and training processes call
it without Prefect. The flows call these wrapped versions instead, so each stage runs as a Prefect task
run that the UI shows, with retries where a stage has them (generate: an engine that lost its worker).
Each keeps its function's name; import it from here in a flow, from tasks/ anywhere else.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

import evoforge.tasks.critic
import evoforge.tasks.evaluate
import evoforge.tasks.filter
import evoforge.tasks.finetune.launch
import evoforge.tasks.generate
import evoforge.tasks.mcts
import evoforge.tasks.pairs
import evoforge.tasks.synthesize
import evoforge.tasks.verify
from evoforge.tasks.generate import transient

judge = task(name="critic", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.critic.judge)
evaluate = task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.evaluate.evaluate)
filter_problems = task(name="filter", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.filter.filter_problems)
generate = task(name="generate", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=[10, 60],
                retry_condition_fn=transient)(evoforge.tasks.generate.generate)
search = task(name="mcts", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.mcts.search)
build_pairs = task(name="pairs", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.pairs.build_pairs)
synthesize = task(name="synthesize", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.synthesize.synthesize)
verify = task(name="verify", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.verify.verify)
train_policy = task(name="finetune", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.finetune.launch.train_policy)
train_ppm = task(name="train_ppm", cache_policy=NO_CACHE, persist_result=False)(evoforge.tasks.finetune.launch.train_ppm)
