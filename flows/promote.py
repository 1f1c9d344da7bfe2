"""`evoforge promote`: a decision by hand on a round's policy checkpoint, which wins over the gate's.

It is written as the round's `promote` output (table `promotions`, decided_by 'manual') under the
run's lock; the next round reads it through `flows/inputs.round_policy`. A later `evoforge promote`
on the same round replaces it.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from evoforge.data import catalog, schemas
from evoforge.data.lake import lake
from evoforge.flows.inputs import MissingInput, checkpoint, promotion
from evoforge.flows.stage_runner import run_guard
from evoforge.tasks.promotion import PROMOTED, REJECTED


def decide_by_hand(run: str, round: int, promote: bool, why: str | None = None) -> dict:
    """Promote (or reject) round `round`'s policy checkpoint; returns the decision row."""
    store = lake()
    store.existing_run_dir(run)
    with run_guard(run, f"round {round} / promote"):
        trained = checkpoint(run, round, "policy")
        if trained is None:
            raise MissingInput(f"run {run!r} round {round} has no policy checkpoint to decide on "
                               f"(its finetune stage has not run, or had nothing to train on)")
        before = promotion(run, round, trained)
        decision = PROMOTED if promote else REJECTED
        row = dict(checkpoint_id=trained["checkpoint_id"], model_id=trained["model_id"], model_round=round + 1,
                   decision=decision, why=why or f"{decision} by hand (evoforge promote)", decided_by="manual",
                   rule="manual", baseline_model_id=trained["parent_model_id"], decided_at=datetime.now(timezone.utc))
        store.publish_stage(run, round, "promote", {"promotions": pa.Table.from_pylist([row], schema=schemas.PROMOTIONS)})
        catalog.refresh_catalog(store.run_dir(run))
    row["previous"] = None if before is None else f"{before['decision']} ({before['decided_by']})"
    return row


def decisions(run: str) -> list[dict]:
    """Every policy checkpoint of the run with the decision in force on it (None: not decided yet)."""
    con = catalog.connect(lake().existing_run_dir(run))
    return catalog.query(con, "promotions_in_force")
