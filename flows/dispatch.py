"""Stages on the machines that fit them: a round starts each stage its config assigns to a work pool
(`cluster.pools`, flows/config.py) as a flow run of the deployment `stage/<pool>` (deploy/prefect.yaml)
and waits for it; a worker of that pool (one per machine, deploy/cluster/worker.sh) runs it.

- Data passes only through the lake. The round saves the run's config into the lake before it
  dispatches anything; a stage run gets (stage, run, round, force) and reads the rest there.
- Locks. While a stage runs on another machine the round does not hold the run's lock: the stage
  takes it on its machine (with the S3 lease, a lock held by the round's process would refuse it).
  The round holds the run's *orchestrator* lock instead (`<run>/_orchestrator`, the same flock or S3
  lease): a second round or evolve of the same run is refused, while the stages it dispatches, and
  single-stage reruns, take the run's own lock as always.
- Lost machines. Prefect 3.6 marks nothing Crashed when a worker or its machine dies: the worker's
  heartbeat only turns the worker OFFLINE, the flow run stays Running (Cloud's "unresponsive run"
  automation, or one of your own on heartbeat events, would mark it), and flow-level retries cover
  exceptions, not crashes. So the round watches the stage run itself: every flow run sends a
  heartbeat event every `cluster.heartbeat_seconds` (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, set for the
  run through its job variables); a Running stage run with none for `cluster.lost_after_seconds` is
  marked Crashed. A Crashed stage run (by the round, or by its worker when its process died) is
  submitted again, `cluster.retries` times, once the run's lock is free (a dead holder's S3 lease has
  expired, so it can commit nothing more); the new run resumes from the chunks the lost one completed.
  Failed or Cancelled stops the round with one line naming the stage and the flow run.
"""
from __future__ import annotations

import datetime as dt
import time
from contextlib import ExitStack, contextmanager
from uuid import UUID

from evoforge.data.lake import lake
from evoforge.data.runlock import RunBusy, run_lock
from evoforge.flows.inputs import FINISHED
from evoforge.flows.stage_runner import StageResult, run_guard
from evoforge.tasks.progress import flow_run_logger

STAGE_FLOW = "stage"  # the flow name of flows/round.py:stage_flow; its deployments are named after pools
ORCHESTRATOR = "_orchestrator"  # <run>/_orchestrator: the lock of the round or evolve orchestrating the run
POOLS = ("gpu", "cpu")  # the machine classes deploy/prefect.yaml declares
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
NOT_STARTED_WARNING_SECONDS = 60.0


class StageRunFailed(ValueError):
    """A dispatched stage run ended Failed, Cancelled, or Crashed past its retries, or cannot be
    started (no deployment for its pool). Said in one line (a ValueError: the CLI prints `error: ...`)."""


def deployment_name(pool: str) -> str:
    return f"{STAGE_FLOW}/{pool}"


def uses_pools(config, stages) -> bool:
    return any(config.cluster.pools.get(name) for name in stages)


# -- the orchestrator's lock ---------------------------------------------------------------------
@contextmanager
def orchestrating(run: str, what: str):
    """Hold the run's orchestrator lock (re-entrant for this thread: an evolve's rounds); RunBusy naming
    the other round if one orchestrates the run already. Not the run's lock: stages take that."""
    with ExitStack() as stack:
        try:
            stack.enter_context(run_lock(lake().run_dir(run) / ORCHESTRATOR, what))
        except RunBusy as err:
            holder = str(err).split(" is busy: ", 1)[-1]
            raise RunBusy(f"run {run!r} is busy: another round orchestrates it: {holder}") from None
        yield


# -- dispatching one stage ---------------------------------------------------------------------------
def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "(no PREFECT_API_URL: a temporary server of this process)"


def _state_line(flow_run) -> str:
    state = flow_run.state
    message = " ".join((state.message or "").split()) if state is not None else ""
    return f"{state.name if state is not None else 'no state'}" + (f": {message[:400]}" if message else "")


def _newest_heartbeat(client, flow_run) -> str | None:
    """The id of the newest heartbeat event of this flow run, None if there is none (or no answer)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    since = (flow_run.created or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(hours=1)  # any clock skew
    until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    try:
        page = client.read_events(EventFilter(
            occurred=EventOccurredFilter(since=since, until=until),
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run.id}"])), limit=1)
    except Exception as err:  # the events API is only one of the signals; the state still counts
        flow_run_logger().debug(f"could not read heartbeats of flow run {flow_run.id}: {err}")
        return None
    return str(page.events[0].id) if page.events else None


def _online_workers(client, pool: str) -> int | None:
    try:
        return sum(1 for w in client.read_workers_for_work_pool(pool) if str(w.status).upper().endswith("ONLINE"))
    except Exception:
        return None


def _find_open_run(client, deployment_id, name: str, parameters: dict):
    """A stage run of this deployment with these parameters that has not ended: submitted by a round
    that died before it finished (only one round orchestrates a run at a time), or by hand."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterName,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]), name=FlowRunFilterName(any_=[name]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[
            StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]))),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=10)
    return next((r for r in runs if r.parameters == parameters), None)


def _submit(deployment: str, name: str, parameters: dict, run: str, heartbeat_seconds: int):
    from prefect.deployments import run_deployment

    return run_deployment(
        name=deployment, parameters=parameters, timeout=0, flow_run_name=name,
        tags=["evoforge", f"run:{run}"],
        # the heartbeat the round watches, whatever the worker's own setting
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds)}},
    )


def _wait(client, flow_run, cluster, label: str, pool: str):
    """Poll until the stage run ends; a Running (or Pending) one that shows no sign of life for
    lost_after_seconds (by this process's clock: the machines' clocks never meet) is marked Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    log = flow_run_logger()
    seen, seen_at = None, time.monotonic()
    scheduled_since, warned = time.monotonic(), False
    while True:
        flow_run = client.read_flow_run(flow_run.id)
        state = flow_run.state
        if state is not None and state.is_final():
            return flow_run
        kind = state.type if state is not None else None
        if kind in (StateType.RUNNING, StateType.PENDING):
            sign = (str(state.id), _newest_heartbeat(client, flow_run) if kind == StateType.RUNNING else None)
            if sign != seen:
                seen, seen_at = sign, time.monotonic()
            limit = cluster.lost_after_seconds * (1 if kind == StateType.RUNNING else 2)
            if time.monotonic() - seen_at > limit:
                message = (f"evoforge: no heartbeat for {limit:.0f} s: the worker or machine running it was lost "
                           f"(the round submits the stage again)")
                log.warning(f"{label}: flow run {flow_run.name!r} ({flow_run.id}) in pool {pool!r} sent no heartbeat "
                            f"for {limit:.0f} s; marking it Crashed")
                client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
                continue
            scheduled_since, warned = time.monotonic(), False
        elif kind == StateType.SCHEDULED and not warned and \
                time.monotonic() - scheduled_since > NOT_STARTED_WARNING_SECONDS:
            warned = True
            online = _online_workers(client, pool)
            who = "no worker of that pool is online" if online == 0 else f"{online} worker(s) of that pool online" \
                if online is not None else "its workers unknown"
            log.warning(f"{label}: flow run {flow_run.name!r} waits for a worker of pool {pool!r} ({who}; start one "
                        f"on a {pool} machine: deploy/cluster/worker.sh {pool})")
        time.sleep(cluster.poll_seconds)


def _await_run_free(run: str, round: int, label: str, poll: float) -> None:
    """Before a lost stage is submitted again: take the run's lock once (and let go). It is free when
    the lost attempt's holder died (flock) or its S3 lease expired, so that attempt can commit nothing
    more; taking it also closes the attempt's `running` event as interrupted and sweeps its leftovers."""
    log = flow_run_logger()
    said = 0.0
    while True:
        try:
            with run_guard(run, f"round {round}: taking the run back from {label}'s lost attempt"):
                return
        except RunBusy as err:
            if time.monotonic() - said > 60:
                said = time.monotonic()
                log.info(f"{label}: waiting for the lost attempt to let go of the run ({err})")
            time.sleep(poll)


def _results(client, run: str, round: int, stage: str, flow_run_id) -> list[StageResult]:
    """The stage_runs events the stage run (and its subflows, one per stage flow) recorded."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    ids = {str(flow_run_id), *(str(child.id) for child in children)}
    events = [e for e in lake().read(run, "stage_runs").to_pylist()
              if e["flow_run_id"] in ids and e["round"] == round and e["stage"] == stage and e["status"] in FINISHED]
    return [StageResult(stage, round, e["status"], e["rows_in"] or 0, e["rows_out"] or 0, e["rows_quarantined"] or 0,
                        e["output_fingerprint"]) for e in sorted(events, key=lambda e: e["started_at"])]


def dispatch_stage(name: str, run: str, round: int, force: bool, pool: str, cluster) -> list[StageResult]:
    """Run one stage as a flow run of `stage/<pool>` and wait for it (see the module's docstring).
    The caller holds the orchestrator lock and not the run's lock."""
    from prefect.exceptions import ObjectNotFound

    log = flow_run_logger()
    label = f"{name} (run {run}, round {round})"
    deployment = deployment_name(pool)
    parameters = {"stage": name, "run": run, "round": round, "force": force}
    flow_run_name = f"{run}/round-{round}/{name}"
    with _client() as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise StageRunFailed(
                f"{label} runs in work pool {pool!r} (cluster.pools) but the Prefect server at {_api_url()} has no "
                f"deployment {deployment!r}: run deploy/cluster/setup.sh against it") from None
        flow_run = _find_open_run(client, found.id, flow_run_name, parameters)
        if flow_run is not None:
            log.info(f"{label}: following flow run {flow_run.name!r} ({flow_run.id}), submitted earlier and not finished")
        attempt = 1
        while True:
            if flow_run is None:
                flow_run = _submit(deployment, flow_run_name, parameters, run, cluster.heartbeat_seconds)
                log.info(f"{label}: submitted to pool {pool!r} as flow run {flow_run.name!r} ({flow_run.id})"
                         + (f", attempt {attempt} of {cluster.retries + 1}" if attempt > 1 else ""))
            try:
                flow_run = _wait(client, flow_run, cluster, label, pool)
            except KeyboardInterrupt:  # the round was stopped: so is the stage it waits for
                _cancel(client, flow_run, label)
                raise
            state = flow_run.state
            if state.is_completed():
                worker = (flow_run.labels or {}).get("prefect.worker.name")
                log.info(f"{label}: flow run {flow_run.name!r} completed in pool {pool!r}"
                         + (f" (worker {worker})" if worker else ""))
                return _results(client, run, round, name, flow_run.id)
            if state.is_crashed() and attempt <= cluster.retries:
                log.warning(f"{label}: flow run {flow_run.name!r} ({flow_run.id}) in pool {pool!r} crashed "
                            f"({_state_line(flow_run)}); submitting the stage again once the run is free")
                _await_run_free(run, round, label, cluster.poll_seconds)
                flow_run, attempt = None, attempt + 1
                continue
            tried = f" after {attempt} attempts" if attempt > 1 else ""
            raise StageRunFailed(f"{label} did not complete in work pool {pool!r}{tried}: flow run {flow_run.name!r} "
                                 f"({flow_run.id}) ended {_state_line(flow_run)} (evoforge status --run {run})")


def _cancel(client, flow_run, label: str) -> None:
    from prefect.states import Cancelling

    try:
        client.set_flow_run_state(flow_run.id, Cancelling(message="the round that started it was stopped"), force=True)
        flow_run_logger().warning(f"{label}: cancelling flow run {flow_run.name!r} ({flow_run.id}); a rerun resumes "
                                  f"from its completed chunks")
    except Exception as err:
        flow_run_logger().debug(f"could not cancel flow run {flow_run.id}: {err}")


# -- where a stage ran --------------------------------------------------------------------------------
def where_it_ran(client, flow_run_id: str | UUID) -> dict:
    """{work_pool, worker, flow_run_id} of the deployment run that a flow run (a stage_runs event's
    flow_run_id: the stage flow, a subflow of `stage`) belongs to: itself or its nearest ancestor with
    a work pool. Both None for a stage that ran in a process no worker started."""
    flow_run = client.read_flow_run(flow_run_id)
    while flow_run.work_pool_name is None and flow_run.parent_task_run_id is not None:
        flow_run = client.read_flow_run(client.read_task_run(flow_run.parent_task_run_id).flow_run_id)
    return {"work_pool": flow_run.work_pool_name, "worker": (flow_run.labels or {}).get("prefect.worker.name"),
            "flow_run_id": str(flow_run.id)}
