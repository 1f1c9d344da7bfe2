"""The lake's history: a run's commits as numbered versions, the run as it was at one of them, what
`vacuum` may remove, and the exact parts a checkpoint trained on.

Each stage folder keeps its own versions (data/manifest.py, History). A run's versions are the commits
of all its stage folders in the order they were made: version N of the run is the run after its Nth
commit. The run's lock lets one writer commit at a time (a round holds it around its stages), so the
state of the run when a stage run started is exactly what that stage read: a checkpoint trained on the
run as it was when its finetune stage began, an evaluation scored what was there when evaluate began.
Those states are what checkpoints, evaluations and reports refer to, and what vacuum keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from evoforge.data import schemas
from evoforge.data.lake import SCHEMA_FOLDER, SCHEMA_PART, Damage, Lake, LakeError, RunHealth
from evoforge.data.manifest import Manifest, ManifestError, Part, mark_vacuumed, part_damage, read_history
from evoforge.data.storage import LakePath

# stage runs whose start pins the run's state: what a checkpoint trained on, an evaluation scored, a report showed
REFERRING_STAGES = ("finetune", "evaluate", "report")


@dataclass(frozen=True)
class Version:
    number: int  # the run's version: its `number`-th commit
    round: int
    stage: str
    folder: LakePath
    manifest: Manifest  # the stage folder's version: its own number, commit, time, config hash and parts
    current: bool  # still the stage's committed output
    superseded_at: datetime | None  # when the stage folder's next commit replaced it (None: current or unknown)

    @property
    def committed_at(self) -> datetime:
        return _time(self.manifest.committed_at)

    def rows(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for part in self.manifest.parts:
            counts[part.table] = counts.get(part.table, 0) + part.rows
        return counts

    def label(self) -> str:
        return f"round {self.round} {self.stage} v{self.manifest.version}"


def _time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def run_history(lake: Lake, run: str) -> list[Version]:
    """Every commit of the run, oldest first, numbered from 1. ManifestError (as DamagedPart's line) names
    a stage folder whose history cannot be read."""
    lake.existing_run_dir(run)
    found = []
    for round, stage, folder in lake.stage_dirs(run):
        try:
            versions = read_history(folder)
            current = lake.manifest(run, round, stage)
        except ManifestError as err:
            raise LakeError(Damage(run, err.path, err.reason, round, stage).line()) from None
        for index, manifest in enumerate(versions):
            following = versions[index + 1] if index + 1 < len(versions) else None
            found.append((round, stage, folder, manifest, current is not None and current.commit == manifest.commit,
                          _time(following.committed_at) if following else None))
    found.sort(key=lambda f: (_time(f[3].committed_at), f[0], f[1], f[3].version))
    return [Version(number, round, stage, folder, manifest, current, superseded_at)
            for number, (round, stage, folder, manifest, current, superseded_at) in enumerate(found, start=1)]


def parse_as_of(text: str) -> int | datetime:
    """A run version (`7`) or a moment (`2026-12-06T17:40:00`, `2026-12-06 17:40`; UTC unless it says)."""
    if text.strip().isdigit():
        return int(text)
    try:
        return _time(text.strip().replace(" ", "T", 1))
    except ValueError:
        raise LakeError(f"--as-of {text!r}: give a version number from `evoforge history` or a time "
                        "such as 2026-12-06T17:40:00 (UTC)") from None


def state_as_of(history: list[Version], as_of: int | datetime) -> list[Version]:
    """The version of each stage folder that was its committed output at version `as_of` of the run
    (or at that moment); a folder not yet committed then is absent."""
    if isinstance(as_of, int) and not 1 <= as_of <= len(history):
        raise LakeError(f"version {as_of}: the run has versions 1 to {len(history)} (`evoforge history`)")
    latest: dict[LakePath, Version] = {}
    for version in history:
        if (version.number <= as_of) if isinstance(as_of, int) else (version.committed_at <= as_of):
            latest[version.folder] = version
    return sorted(latest.values(), key=lambda v: (v.round, v.stage))


def state_health(lake: Lake, run: str, state: list[Version]) -> RunHealth:
    """What the views read for the run as it was in `state`: each table's parts in those versions,
    checked cheaply as every query's are. A state whose parts `vacuum` removed is refused in one line:
    its answers would be wrong, not partial."""
    gone = [v for v in state if v.manifest.vacuumed_at]
    if gone:
        raise LakeError(f"run {run}: {', '.join(v.label() for v in gone)} lost parts to `evoforge vacuum` "
                        f"(at {gone[0].manifest.vacuumed_at[:19]}); `evoforge history --run {run}` shows what is whole")
    run_dir = lake.run_dir(run)
    health = RunHealth()
    for table in schemas.ROUND_TABLES:
        schema_file = run_dir / "round=0" / SCHEMA_FOLDER / table / SCHEMA_PART
        health.files[table] = [schema_file] if schema_file.exists() else []
    for version in state:
        for part in version.manifest.parts:
            reason = part_damage(version.folder, part, checksum=False)
            if reason:
                health.damaged.append(Damage(run, version.folder / part.file, reason, version.round, version.stage))
            elif part.table in health.files:
                health.files[part.table].append(version.folder / part.file)
    now = lake.inspect(run)
    for table in schemas.RUN_TABLES:  # events, not versioned: a past state still sees every stage run
        health.files[table] = now.files[table]
    health.damaged += [d for d in now.damaged if d.stage is None]
    return health


# -- what is referred to, and vacuum -----------------------------------------------------------------------
def referred_states(lake: Lake, run: str, history: list[Version]) -> dict[str, list[Version]]:
    """For each stage run that pins the run's state (REFERRING_STAGES), the versions it could read:
    those current when it started, of its round and the rounds before. Keyed by a line naming it."""
    events = lake.read(run, "stage_runs").to_pylist()
    pinned = {}
    for event in events:
        if event["stage"] in REFERRING_STAGES and event["status"] in ("completed", "skipped") and event["started_at"]:
            started = event["started_at"] if event["started_at"].tzinfo else event["started_at"].replace(tzinfo=timezone.utc)
            label = f"{event['stage']} of round {event['round']} (stage run {event['stage_run_id'][:12]}, {started:%Y-%m-%d %H:%M:%S})"
            pinned[label] = [v for v in state_as_of(history, started) if v.round <= event["round"]]
    return pinned


@dataclass
class VacuumPlan:
    run: str
    older_than: timedelta
    removable: list[tuple[LakePath, Part, list[Version]]] = field(default_factory=list)  # path, part, versions listing it
    kept_referred: dict[LakePath, str] = field(default_factory=dict)  # superseded part -> what refers to it
    kept_recent: list[LakePath] = field(default_factory=list)  # superseded less than older_than ago

    @property
    def bytes(self) -> int:
        return sum(part.bytes for _, part, _ in self.removable)


def plan_vacuum(lake: Lake, run: str, older_than: timedelta, now: datetime | None = None) -> VacuumPlan:
    """The parts that only superseded versions list, superseded more than `older_than` ago, which no
    checkpoint, evaluation or report refers to (`referred_states`), nor any current output."""
    now = now or datetime.now(timezone.utc)
    history = run_history(lake, run)
    plan = VacuumPlan(run, older_than)
    keep: dict[LakePath, str] = {}
    for version in history:
        if version.current:
            for part in version.manifest.parts:
                keep.setdefault(version.folder / part.file, "the current output")
    for label, versions in referred_states(lake, run, history).items():
        for version in versions:
            for part in version.manifest.parts:
                keep.setdefault(version.folder / part.file, label)
    listing: dict[LakePath, tuple[Part, list[Version]]] = {}
    for version in history:
        for part in version.manifest.parts:
            listing.setdefault(version.folder / part.file, (part, []))[1].append(version)
    for path, (part, versions) in sorted(listing.items()):
        if path in keep:
            if keep[path] != "the current output":
                plan.kept_referred[path] = keep[path]
            continue
        if any(v.superseded_at is None or now - v.superseded_at < older_than for v in versions):
            plan.kept_recent.append(path)
            continue
        if path.exists():
            plan.removable.append((path, part, versions))
    return plan


def apply_vacuum(plan: VacuumPlan) -> int:
    """Remove the plan's parts (caller holds the run's lock); each version losing parts says so in its
    history copy first, so a past state that needs them is named as vacuumed, not as damaged."""
    when = datetime.now(timezone.utc).isoformat()
    marked = set()
    for _, _, versions in plan.removable:
        for version in versions:
            if version.manifest.commit not in marked and not version.manifest.vacuumed_at:
                mark_vacuumed(version.folder, version.manifest, when)
                marked.add(version.manifest.commit)
    for path, _, _ in plan.removable:
        path.unlink(missing_ok=True)
    return len(plan.removable)


# -- lineage -------------------------------------------------------------------------------------------
@dataclass
class Lineage:
    run: str
    checkpoint: dict  # its checkpoints row
    committed_by: Version  # the finetune version that registered it
    stage_run: dict | None  # the finetune stage run that committed it (None: committed outside a stage run)
    inputs: list[Version]  # the run's state when training began: the versions it could read

    def parts(self) -> list[tuple[Version, Part]]:
        return [(version, part) for version in self.inputs for part in version.manifest.parts]


def checkpoint_lineage(lake: Lake, checkpoint: str) -> Lineage:
    """The exact parts a checkpoint (its id, model id or path) trained on: the run's state when the
    finetune stage run that registered it began (before its own commit when no stage run is recorded)."""
    for run in lake.runs():
        history = run_history(lake, run)
        for version in history:
            if version.stage != "finetune" or not any(p.table == "checkpoints" for p in version.manifest.parts):
                continue
            rows = lake.read_parts(run, version.round, version.stage, version.manifest.parts, "checkpoints").to_pylist()
            match = next((r for r in rows if checkpoint in (r["checkpoint_id"], r["model_id"], r["path"])), None)
            if match is None:
                continue
            events = [e for e in lake.read(run, "stage_runs").to_pylist()
                      if e["stage"] == "finetune" and e["round"] == version.round and e["status"] == "completed"
                      and e["output_fingerprint"] == version.manifest.fingerprint()]
            stage_run = min(events, key=lambda e: e["started_at"]) if events else None
            if stage_run is not None:
                started = stage_run["started_at"]
                state = state_as_of(history, started if started.tzinfo else started.replace(tzinfo=timezone.utc))
            else:
                state = state_as_of(history, version.number - 1) if version.number > 1 else []
            inputs = [v for v in state if v.round <= version.round and v.folder != version.folder]
            return Lineage(run, match, version, stage_run, inputs)
    raise LakeError(f"checkpoint {checkpoint!r}: no run under {lake.root} registered it "
                    "(give its checkpoint_id, model_id or path, as `evoforge sql --run R checkpoints` shows them)")
