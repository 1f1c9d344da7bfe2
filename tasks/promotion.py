"""The promotion gate: whether a round's checkpoint becomes the next round's policy.

The evaluate stage measures the checkpoint and the policy it was trained from (the last promoted
model) on the same held-out problems, with a paired interval on the change (tasks/intervals.py);
`decide` applies the configured rule to those intervals. A rejected checkpoint stays in the lake
and in `checkpoints`; the next round starts again from the last promoted one.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from evoforge.data.section import Section

PROMOTED, REJECTED = "promoted", "rejected"


class GateConfig(Section):
    require: Literal["not_worse", "better", "always"] = Field(
        "not_worse", description="not_worse: reject when the paired interval of the change lies wholly below 0 on a "
                                 "set; better: promote only when it lies wholly above 0 on a set and below on none; "
                                 "always: no interval rule (max_entropy_drop still applies; the comparison is recorded)")
    metric: Literal["pass@1", "pass@k"] = Field("pass@1", description="pass@k: the largest k of evaluate.pass_k")
    sets: list[str] = Field(default_factory=list, description="held-out sets the rule reads (default: all of evaluate.sets)")
    max_entropy_drop: float | None = Field(
        None, ge=0, le=1, description="also reject when held-out entropy fell by more than this fraction on a set")

    def describe(self, k: int) -> str:
        metric = f"pass@{k}" if self.metric == "pass@k" else "pass@1"
        where = ", ".join(self.sets) if self.sets else "every held-out set"
        entropy = f"; entropy drop <= {self.max_entropy_drop:.0%}" if self.max_entropy_drop is not None else ""
        return f"{self.require} on {metric} over {where}{entropy}"


def gate_metric(config: GateConfig, pass_k: list[int]) -> str:
    return f"pass@{max(pass_k)}" if config.metric == "pass@k" else "pass@1"


def decide(config: GateConfig, changes: list[dict], entropies: dict[str, tuple[float, float]],
           evaluated: list[str]) -> tuple[str, str]:
    """(decision, why). `changes`: the trained model's `score_intervals` rows for the gate's metric,
    each with the paired change against its baseline; `entropies`: set -> (baseline, new) held-out
    entropy; `evaluated`: the sets the model was measured on (the rule's default). A set the rule reads
    without a paired comparison is a reason to reject: nothing unmeasured passes."""
    by_set = {row["eval_set"]: row for row in changes}
    sets = config.sets or sorted(evaluated)
    if not sets:
        return REJECTED, "no held-out set was measured"
    missing = [s for s in sets if s not in by_set or by_set[s]["change"] is None]
    if missing:
        return REJECTED, f"no paired comparison on {', '.join(missing)}"
    lines = [f"{s}: {by_set[s]['metric']} change {by_set[s]['change']:+.3f} "
             f"[{by_set[s]['change_low']:+.3f}, {by_set[s]['change_high']:+.3f}]" for s in sets]
    worse = [s for s in sets if by_set[s]["change_high"] < 0]
    better = [s for s in sets if by_set[s]["change_low"] > 0]
    collapsed = []
    if config.max_entropy_drop is not None:
        for s in sets:
            before, after = entropies.get(s, (None, None))
            if before and after is not None and (before - after) / before > config.max_entropy_drop:
                collapsed.append(f"{s}: entropy {before:.3f} -> {after:.3f}")
    summary = "; ".join(lines)
    if collapsed:
        return REJECTED, f"entropy fell by more than {config.max_entropy_drop:.0%} ({'; '.join(collapsed)}); {summary}"
    if config.require == "always":
        return PROMOTED, f"no gate (require: always); {summary}"
    if worse:
        return REJECTED, f"significantly worse on {', '.join(worse)}: {summary}"
    if config.require == "better" and not better:
        return REJECTED, f"not significantly better on any set: {summary}"
    verdict = f"significantly better on {', '.join(better)}" if better else "not significantly worse"
    return PROMOTED, f"{verdict}: {summary}"
