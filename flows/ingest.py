"""ingest flow: one source file -> round 0 `problems` + `quarantine`, committed together as that
source's parts (one commit per source)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from evoforge.data.ids import fingerprint_files, stable_hash
from evoforge.data.lake import lake
from evoforge.flows.config import config_hash, resolve_path
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.decontam import Decontaminator
from evoforge.tasks.ingest import (EvalSetConfig, IngestError, SourceConfig, ingest, is_hub, load_eval_questions,
                                   open_hub_source)
from evoforge.tasks.verify import VerifyConfig, check_golds


def _input_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def build_decontaminator(eval_sets: list[EvalSetConfig]) -> Decontaminator | None:
    if not eval_sets:
        return None
    decontaminator = Decontaminator()
    for eval_set in eval_sets:
        decontaminator.add_set(eval_set.name, load_eval_questions(eval_set, resolve_path(".")))
    return decontaminator


@flow(name="ingest", flow_run_name="{run}/ingest")
def ingest_flow(
    run: str,
    source: SourceConfig,
    eval_sets: list[EvalSetConfig] | None = None,
    verify: VerifyConfig | None = None,
    force: bool = False,
) -> StageResult:
    eval_sets = eval_sets or []
    verify = verify or VerifyConfig()
    if is_hub(source.path):  # hub:ORG/NAME: loaded here, so its revision is part of the key
        path = open_hub_source(source)
        source_fp, label, part = path.fingerprint, path.label, stable_hash(path.label)
    else:
        path = resolve_path(source.path)
        if not path.exists():
            raise IngestError(f"{source.path}: no such file or folder")
        files = _input_files(path)
        source_fp = fingerprint_files(files) if files else "empty"
        # one part per source path: re-ingesting an edited file replaces its rows instead of adding to them
        label, part = source.path, stable_hash(path.resolve())
    eval_fp = fingerprint_files([f for s in eval_sets for f in _input_files(resolve_path(s.path))]) if eval_sets else ""
    unset = {"subset"} if source.subset is None else set()  # a file source's key is what it was before `subset`
    settings = {"source": source.model_dump(mode="json", exclude={"path"} | unset), "eval_sets": [
        e.model_dump(mode="json") for e in eval_sets]}
    input_fp = f"{source_fp}:{eval_fp}"
    store = lake()

    def compute(_chunks):
        # a re-ingest of this source must not call its own earlier rows duplicates (nor read them:
        # they may be the damaged part it is rerun to replace)
        known = set(store.read(run, "problems", exclude_key=part)["problem_id"].to_pylist())
        result = ingest(
            path, source,
            check_golds=lambda answers: check_golds(answers, verify),
            known_ids=known,
            decontaminator=build_decontaminator(eval_sets),
            source_label=label,
        )
        return {"problems": result.problems, "quarantine": result.quarantine}

    return execute_stage(
        run, 0, "ingest", config_hash=config_hash(settings), model_id=None, input_fingerprint=input_fp,
        rows_in=None, compute=compute, force=force, part=part,
    )
