"""`evoforge`: the command line. Every command is a thin call into the flows.

Errors a user can fix print as one line (`error: ...`) with exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from evoforge.data import home

home.configure()  # before Prefect, vLLM, torch or HF are imported anywhere


def _user_errors() -> tuple[type[BaseException], ...]:
    from evoforge.data.lake import LakeError
    from evoforge.data.runlock import LeaseLost, LockUnavailable, RunBusy
    from evoforge.data.storage import StorageError
    from evoforge.flows.config import ConfigError
    from evoforge.flows.inputs import MissingInput
    from evoforge.models.checkpoint_store import CheckpointError
    from evoforge.models.registry import ModelError
    from evoforge.tasks.export import ExportError
    from evoforge.tasks.ingest import IngestError

    return (IngestError, LakeError, ConfigError, MissingInput, ModelError, FileNotFoundError, RunBusy, LockUnavailable,
            LeaseLost, StorageError, CheckpointError, ExportError)


def cmd_ingest(args) -> None:
    from evoforge.flows.config import load_config
    from evoforge.flows.ingest import ingest_flow
    from evoforge.tasks.ingest import EvalSetConfig, SourceConfig, is_hub

    source = SourceConfig(
        path=args.path if is_hub(args.path) else str(Path(args.path).resolve()), preset=args.preset,
        question_field=args.question_field, answer_field=args.answer_field, name=args.name, limit=args.limit,
        reference_field=args.reference_field, task=args.task, split=args.split, subset=args.subset,
    )
    eval_sets: list[EvalSetConfig] = load_config(args.config).eval_sets if args.config else []
    result = ingest_flow(args.run, source, eval_sets, force=args.force)
    print(f"ingest {args.path} -> run {args.run}: {result.rows_in} rows read, {result.rows_out} problems, "
          f"{result.rows_quarantined} quarantined ({result.status})")
    if "quarantine" in result.tables and result.tables["quarantine"].num_rows:
        counts = Counter(result.tables["quarantine"]["reason"].to_pylist())
        print("  quarantined by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print(f"  details: evoforge sql --run {args.run} quarantine_reasons")


def _print_stage_results(results) -> None:
    for r in results:
        print(f"  {r.stage:<9} round {r.round}: {r.status:<9} in {r.rows_in:>6}  out {r.rows_out:>6}  "
              f"quarantined {r.rows_quarantined}")


# the shipped config a command falls back to for a run that has none saved (one `evoforge ingest` started)
SHIPPED_DEFAULT_CONFIGS = {"round": "demo.yaml", "stage": "demo.yaml", "evolve": "evolve.yaml"}


def _command_config(args):
    """--config if given; else None when the run has a saved config (the flows read it); else the
    command's shipped default, said in one line."""
    from evoforge.data.home import PROJECT_ROOT
    from evoforge.data.lake import lake
    from evoforge.flows.config import load_config
    from evoforge.flows.inputs import saved_config_path

    if args.config:
        return load_config(args.config)
    lake().existing_run_dir(args.run)  # with no config, a misspelt run must not start a new one
    if saved_config_path(args.run).exists():
        return None
    path = PROJECT_ROOT / "deploy" / "configs" / SHIPPED_DEFAULT_CONFIGS[args.command]
    print(f"run {args.run!r} has no saved config: using the shipped {path.relative_to(PROJECT_ROOT)} (--config FILE to choose)")
    return load_config(path)


def _use_config_lake(args) -> None:
    """A --config with `lake:` puts the runs there, unless this machine sets EVOFORGE_RUNS (which wins)."""
    if not getattr(args, "config", None) or os.environ.get("EVOFORGE_RUNS"):
        return
    from evoforge.flows.config import load_config

    where = load_config(args.config).lake
    if where:
        from evoforge.data.lake import use_lake

        os.environ["EVOFORGE_RUNS"] = where  # for the processes this command starts too
        use_lake(where)


def cmd_round(args) -> None:
    from evoforge.flows.report import format_summary, round_summary
    from evoforge.flows.round import round_flow

    config = _command_config(args)
    started = time.monotonic()
    results = round_flow(args.run, config, round=args.round, force=args.force)
    _print_stage_results(results)
    if results and any(r.stage == "filter" for r in results):
        print(format_summary(round_summary(args.run, results[-1].round)))
    print(f"round took {time.monotonic() - started:.0f} s")


def cmd_stage(args) -> None:
    from evoforge.flows.round import run_stage

    config = _command_config(args)
    _print_stage_results(run_stage(args.name, args.run, args.round, config, args.force))


def _print_report(run: str, out: str | None = None) -> None:
    from evoforge.data.lake import lake
    from evoforge.flows.report import collect, format_report, pin_report, plot

    lake().existing_run_dir(run)
    version = pin_report(run)  # before reading: a round committing meanwhile can only make what it reads newer
    data = collect(run)
    print(format_report(run, data))
    print(f"data: run version {version} (`evoforge sql --run {run} --as-of {version} ...` reads it again; "
          "vacuum keeps it)")
    png = plot(run, data, Path(out) if out else lake().run_dir(run) / "report.png")
    if png:
        print(f"plot: {png}")


def cmd_evolve(args) -> None:
    from evoforge.flows.round import evolve_flow

    config = _command_config(args)
    started = time.monotonic()
    _print_stage_results(evolve_flow(args.run, args.rounds, config, force=args.force))
    _print_report(args.run)
    print(f"{args.rounds} round(s) took {time.monotonic() - started:.0f} s")


def cmd_report(args) -> None:
    _print_report(args.run, args.out)


def cmd_promote(args) -> None:
    from evoforge.flows.promote import decide_by_hand, decisions

    if args.round is None:
        for d in decisions(args.run):
            by = f" ({d['decided_by']})" if d["decided_by"] else ""
            why = f": {d['why']}" if d["why"] else ""
            print(f"  round {d['round']}: model {d['round'] + 1} {d['checkpoint_id']} {d['decision'] or 'undecided'}{by}{why}")
        return
    row = decide_by_hand(args.run, args.round, promote=not args.reject, why=args.why)
    was = f" (was {row['previous']})" if row["previous"] else ""
    follows = "sample from it" if row["decision"] == "promoted" else "start from the last promoted model before it"
    print(f"run {args.run}, round {args.round}: {row['checkpoint_id']} {row['decision']} by hand{was}; "
          f"round {args.round + 1} and later {follows} (a round already run recomputes when run again: "
          f"evoforge round --run {args.run} --round {args.round + 1})")


def cmd_demo(args) -> None:
    from evoforge.flows.config import DEFAULT_CONFIG

    started = time.monotonic()
    args.config = args.config or str(DEFAULT_CONFIG)
    args.round = 0
    cmd_round(args)
    from evoforge.data.lake import lake

    run_dir = lake().run_dir(args.run)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    print(f"  lake:    {run_dir}")
    print(f"  catalog: {run_dir / 'catalog.duckdb'}   (evoforge sql --run {args.run} buckets)")
    print("  Prefect: start the UI with `evoforge ui` (http://127.0.0.1:4200); while it is up, evoforge\n"
          "           commands report their flow runs, logs and artifacts to it")


def cmd_sql(args, health=None) -> None:
    import duckdb

    from evoforge.data import catalog
    from evoforge.data.lake import LakeError, lake

    # a damaged part is left out of the views and named on stderr; the rest of the run still answers
    read_only = not getattr(args, "allow_writes", False)
    if getattr(args, "all_runs", False) and (args.run or args.as_of):
        raise LakeError("--all-runs reads every run as it is now: it takes neither --run nor --as-of")
    if getattr(args, "all_runs", False):
        where, health = lake().root, catalog.all_runs_health(lake().root)
    else:
        if not args.run:
            raise LakeError("name a run (--run R) or query every run of the lake (--all-runs)")
        where = lake().existing_run_dir(args.run)
        if getattr(args, "as_of", None):
            health = _health_as_of(args.run, args.as_of)
    con = catalog.connect(where, report=lambda line: print(line, file=sys.stderr), health=health, read_only=read_only)
    query = catalog.resolve_query(args.query)
    if read_only:
        catalog.check_read_only(query)
    try:
        cursor = con.execute(query)
    except duckdb.PermissionException as err:  # the session's lock (data/catalog.py lock_to_parts) said no
        raise catalog.ReadOnlyError(f"{str(err).splitlines()[0]}: evoforge sql reads the run's tables only; "
                                    "--allow-writes to run it anyway") from None
    names = [d[0] for d in cursor.description]
    rows = cursor.fetchall()
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(names)
        writer.writerows(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*names)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    # off a terminal (a pipe, a log) rich would squeeze columns into 80 characters
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def _health_as_of(run: str, as_of: str):
    """The parts the views read for the run as it was at version `as_of` (or that moment), saying which."""
    from evoforge.data import history
    from evoforge.data.lake import lake

    versions = history.run_history(lake(), run)
    state = history.state_as_of(versions, history.parse_as_of(as_of))
    last = max((v.number for v in state), default=0)
    print(f"run {run} as of version {last} of {len(versions)}"
          + (f" ({versions[last - 1].committed_at:%Y-%m-%d %H:%M:%S} UTC)" if last else " (before its first commit)"),
          file=sys.stderr)
    return history.state_health(lake(), run, state)


def cmd_export(args) -> None:
    from evoforge.data.lake import lake
    from evoforge.flows.config import load_config
    from evoforge.flows.export import export_run
    from evoforge.flows.inputs import saved_config_path

    config = load_config(args.config) if args.config else None
    if config is None and lake().existing_run_dir(args.run) and not saved_config_path(args.run).exists():
        print(f"run {args.run!r} has no saved config: the card states the default settings (--config FILE to give the run's)")
    result = export_run(args.run, args.table, args.to, rounds=args.round, format=args.format, private=args.private,
                        overwrite=args.overwrite, config=config, license=args.license, tags=args.tag)
    rows = ", ".join(f"{name} {count}" for name, count in result.rows.items())
    print(f"export run {args.run} (version {result.version}) -> {result.target}: {rows}")
    if result.empty:
        print(f"  no rows, left out: {', '.join(result.empty)}")
    if not result.target.startswith("hub:"):
        print(f"  load it: datasets.load_dataset({str(result.folder)!r}, CONFIG, split='train')"
              + (f" or datasets.load_from_disk('{result.folder}/CONFIG')" if (args.format or "arrow") == "arrow" else ""))


def cmd_history(args) -> None:
    """Every commit of the run: its version, time, stage, config hash, rows per table, and what became of it."""
    from rich.console import Console
    from rich.table import Table

    from evoforge.data import history
    from evoforge.data.lake import lake

    table = Table("version", "committed (UTC)", "round", "stage", "stage version", "config hash", "rows", "state")
    for v in history.run_history(lake(), args.run):
        state = "current" if v.current else ("vacuumed" if v.manifest.vacuumed_at else "superseded")
        rows = ", ".join(f"{name} {count}" for name, count in sorted(v.rows().items())) or "no rows"
        table.add_row(str(v.number), f"{v.committed_at:%Y-%m-%d %H:%M:%S}", str(v.round), v.stage,
                      str(v.manifest.version), (v.manifest.config_hash or "")[:12], rows, state)
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    print(f"read a past version: evoforge sql --run {args.run} --as-of VERSION \"SELECT ...\"")


def cmd_vacuum(args) -> None:
    """Remove superseded parts nothing refers to; a dry run unless --apply."""
    from datetime import timedelta

    from evoforge.data import history
    from evoforge.data.lake import lake
    from evoforge.data.runlock import run_lock

    older = _duration(args.older_than)
    store = lake()
    with run_lock(store.existing_run_dir(args.run), "vacuum"):  # no commit while the plan is made and carried out
        plan = history.plan_vacuum(store, args.run, timedelta(seconds=older))
        for path, part, versions in plan.removable:
            print(f"{'remove' if args.apply else 'would remove'} {path.relative_to(store.run_dir(args.run))} "
                  f"({part.rows} rows, {part.bytes} bytes; {', '.join(v.label() for v in versions)})")
        removed = history.apply_vacuum(plan) if args.apply else 0
    kept = f"kept: {len(plan.kept_referred)} superseded part(s) a checkpoint, evaluation or report refers to, " \
           f"{len(plan.kept_recent)} superseded less than {args.older_than} ago"
    if args.apply:
        print(f"vacuum run {args.run}: removed {removed} part(s), {plan.bytes} bytes; {kept}")
    else:
        print(f"vacuum run {args.run} (dry run): {len(plan.removable)} part(s), {plan.bytes} bytes would go; {kept}; "
              "--apply to remove them")


def _duration(text: str) -> float:
    """`30d`, `12h`, `45m`, `90s` or `0` as seconds."""
    import re

    from evoforge.data.lake import LakeError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text or "")
    if not match or (not match[2] and float(match[1]) != 0):
        raise LakeError(f"--older-than {text!r}: give a duration such as 30d, 12h, 45m, 90s (or 0)")
    return float(match[1]) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 0}[match[2]]


def cmd_lineage(args) -> None:
    """The exact parts a checkpoint trained on."""
    from evoforge.data import history
    from evoforge.data.lake import lake

    store = lake()
    found = history.checkpoint_lineage(store, args.checkpoint)
    row = found.checkpoint
    print(f"checkpoint {row['checkpoint_id']} ({row['model_id']}): run {found.run}, round {found.committed_by.round}, "
          f"method {row['method']}, {row['train_rows']} training rows, data fingerprint {row['data_fingerprint']}")
    print(f"  registered by {found.committed_by.label()} (run version {found.committed_by.number})"
          + (f", stage run {found.stage_run['stage_run_id']} started {found.stage_run['started_at']:%Y-%m-%d %H:%M:%S} UTC"
             if found.stage_run else ""))
    print("  trained on the run as it was then:")
    run_dir = store.run_dir(found.run)
    for version, part in found.parts():
        state = "current" if version.current else ("vacuumed" if version.manifest.vacuumed_at else "superseded")
        print(f"    {version.label()} ({state}) {part.table}: {(version.folder / part.file).relative_to(run_dir)} "
              f"{part.rows} rows sha256 {part.sha256[:16]}")


def _not_data(path: Path) -> str:
    return f"not data: {path} (no manifest lists it; evoforge ignores it)"


def cmd_status(args) -> None:
    from evoforge.data import catalog
    from evoforge.data.lake import lake

    args.query = "status"
    args.csv = False
    health = catalog.run_health(lake().existing_run_dir(args.run))
    cmd_sql(args, health)
    for path in health.unnamed:
        print(_not_data(path), file=sys.stderr)
    if health.legacy:
        print(f"{len(health.legacy)} part(s) written by an evoforge before manifests are not read: "
              f"`evoforge doctor --run {args.run} --repair` commits them as they are", file=sys.stderr)
    if health.leftovers:
        print(f"{len(health.leftovers)} uncommitted file(s) of a writer at work or one that died "
              "(swept when the next stage starts)", file=sys.stderr)
    if health.superseded:
        print(f"{len(health.superseded)} part(s) of earlier versions are kept (`evoforge history --run {args.run}`; "
              f"`evoforge vacuum --run {args.run} --older-than 30d` lists what nothing refers to)", file=sys.stderr)


def cmd_doctor(args) -> int:
    """Check every committed part against its manifest, checksums included; --repair moves damaged
    files aside and uncommits what they belonged to, so the next round recomputes it."""
    from evoforge.data import catalog
    from evoforge.data.lake import SCHEMA_PART, lake
    from evoforge.data.runlock import run_lock

    store = lake()
    run_dir = store.existing_run_dir(args.run)
    health = store.inspect(args.run, checksum=True)
    parts = sum(1 for files in health.files.values() for path in files if path.name != SCHEMA_PART)
    for damage in health.damaged:
        print(damage.line())
    for path in health.unnamed:
        print(_not_data(path))
    print(f"run {args.run}: {parts} file(s) match their manifests, {len(health.damaged)} damaged, "
          f"{len(health.unnamed)} not data, {len(health.leftovers)} uncommitted leftover(s), "
          f"{len(health.legacy)} part(s) written before manifests")
    if not args.repair:
        if health.damaged or health.legacy:
            print(f"evoforge doctor --run {args.run} --repair: move the damaged files aside and mark their stages "
                  "for recomputation; commit the parts written before manifests as they are")
        return 1 if health.damaged or health.legacy else 0
    with run_lock(run_dir, "doctor --repair"):
        store.ensure_run(args.run, check=True)  # a schema file removed or damaged since this process began
        swept = store.sweep(args.run)
        health = store.inspect(args.run, checksum=True)
        for line in store.adopt_legacy(args.run, health.legacy) + store.repair(args.run, health.damaged):
            print(line)
    if swept:
        print(f"removed {swept} leftover(s) of writers that died")
    catalog.refresh_catalog(run_dir)
    return 0


def cmd_verify_file(args) -> None:
    from evoforge.data import atomic
    from evoforge.tasks.verify import VerifyConfig, grade_file

    path, out = Path(args.input), Path(args.out)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):  # before the grading, not after it
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist or is not writable")
    written = grade_file(path, VerifyConfig(workers=args.workers, deadline_seconds=args.deadline))
    atomic.write_text(out, "".join(json.dumps(row) + "\n" for row in written))
    counts = Counter(row["verdict"] for row in written)
    print(f"{len(written)} lines -> {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for row in written:
        if row["verdict"] == "invalid_input":
            print(f"  {row['detail']} (verdict invalid_input)")


def cmd_sandbox(args) -> None:
    from evoforge.models.sandbox import SandboxConfig, run_file

    path = Path(args.file)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    config = SandboxConfig(wall_seconds=args.wall, memory_mb=args.memory_mb, isolation=args.isolation)
    result = run_file(path, config)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"[sandbox] {result.status} (exit {result.exit_code}) in {result.seconds:.2f} s"
          + (", output truncated" if result.truncated else ""), file=sys.stderr)
    if result.status != "ok":
        raise SystemExit(1)


def cmd_ui(args) -> None:
    from evoforge.app.postgres import database_choice, prefect_database, refuse_password_in_argv
    from evoforge.app.prefect_server import api_url, auth_file, project_server_url, server_auth_string, start_server

    url = api_url(args.host, args.port)
    auth = server_auth_string(args.host)  # before anything starts: a server others reach never runs without one
    refuse_password_in_argv(args.database)
    choice = database_choice(args.database)  # a wrong value fails before anything starts
    if project_server_url() == url:
        print(f"this project's Prefect server already answers: UI {url.removesuffix('/api')}")
        return
    # the PostgreSQL it starts is stopped on the way out, after the Prefect server (Ctrl-C, kill, failure)
    with prefect_database(choice, args.postgres_port) as database:
        server = start_server(args.host, args.port, database_url=database.url, auth_string=auth)
        if auth:
            where = ("PREFECT_SERVER_API_AUTH_STRING" if os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
                     else f"{auth_file()} (mode 0600)")
            access = (f"API auth: on, the string in {where}; the UI asks for it once per browser. Other machines "
                      f"and workers: copy it to their Prefect home's {auth_file().name} (mode 0600) or set "
                      f"PREFECT_API_AUTH_STRING in their environment (not on a command line)\n")
        else:
            access = f"API auth: off (a server on {args.host} answers this machine only; any other --host turns it on)\n"
        try:
            print(f"Prefect UI: {url.removesuffix('/api')}   API: {url}\n"
                  f"database: {database.shown}   log: {Path(os.environ['PREFECT_HOME']) / 'server.log'}\n"
                  f"{access}evoforge commands run while it is up show in it; Ctrl-C stops it.", flush=True)
            server.wait()
        except KeyboardInterrupt:
            pass  # Ctrl-C or kill: the way to stop it
        finally:
            from evoforge.app.prefect_server import stop_server

            stop_server(server)


def cmd_engine_serve(args) -> int:
    """N local `vllm serve` replicas of a model until Ctrl-C or kill; a replica that dies is started again."""
    from evoforge.models.engine import EngineConfig, LaunchConfig
    from evoforge.models.registry import resolve
    from evoforge.models.vllm_servers import ServerFleet, serve_api_key

    key, kept_in = serve_api_key(args.host)  # before anything starts: replicas others reach never run without one
    model = resolve(args.model)
    fleet = ServerFleet(model, EngineConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len),
                        LaunchConfig(replicas=args.replicas, port=args.port, threads_per_replica=args.threads_per_replica),
                        host=args.host, api_key=key)
    print(f"starting {args.replicas} vllm serve replica(s) of {model.model_id} ...", flush=True)
    try:
        fleet.start()
        for replica in fleet.running:
            print(f"  {fleet.endpoints[replica.index]}   on {'GPU' if fleet.gpu_count() else 'cores'} {replica.devices}"
                  f"   log: {replica.log_path}")
        if key:
            print(f"API key: on, in {kept_in}; every request needs it (Authorization: Bearer). On the machines that "
                  f"generate: VLLM_API_KEY in the environment (export VLLM_API_KEY=\"$(cat {kept_in})\" where the file "
                  f"is readable; not on a command line)", flush=True)
        print("in a round config:\n  engine:\n    backend: openai\n"
              f"    model: {args.model}\n    max_model_len: {args.max_model_len}\n"
              f"    endpoints: [{', '.join(fleet.endpoints)}]\n" + ("    api_key_env: VLLM_API_KEY\n" if key else "") +
              "Ctrl-C stops them.", flush=True)
        fleet.keep_alive(on_restart=lambda replica: print(
            f"replica on port {replica.port} exited ({replica.process.returncode}): starting it again",
            file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        return 0
    finally:
        fleet.stop()
        print(f"stopped {args.replicas} replica(s)", flush=True)


def cmd_serve(args) -> None:
    from evoforge.flows.config import DEFAULT_CONFIG
    from evoforge.app.prefect_server import serve

    serve(args.run, args.config or DEFAULT_CONFIG, cron=args.cron, limit=args.limit)


def cmd_pools_setup(args) -> int:
    from evoforge.app.pools import setup

    return setup(args.passed_on)


def cmd_worker(args) -> int:
    from evoforge.app.pools import worker

    return worker(args.pool, args.name, args.passed_on)


def _use_running_server() -> None:
    """When this project's `evoforge ui` is up and no API is set, flow runs go to it, so the UI shows
    the CLI's too. Whatever else answers on its port (another project's server) is not used."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from evoforge.app.prefect_server import project_server_url

    url = project_server_url()
    if url is not None:
        os.environ["PREFECT_API_URL"] = url


def parser() -> argparse.ArgumentParser:
    from evoforge.flows.stages import STAGES

    p = argparse.ArgumentParser(prog="evoforge", description="A data factory for self-evolving reasoning models.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a round (ingest -> filter) on the default model into the run 'demo'")
    demo.add_argument("--run", default="demo")
    demo.add_argument("--config", default=None, help="default: deploy/configs/demo.yaml")
    demo.add_argument("--force", action="store_true")
    demo.set_defaults(func=cmd_demo)

    ingest = sub.add_parser("ingest", help="read a JSONL/Parquet/datasets source or a hub dataset into a run's pool")
    ingest.add_argument("path", help="a file, a `datasets` folder, or hub:ORG/NAME (from the Hugging Face cache)")
    ingest.add_argument("--run", required=True)
    ingest.add_argument("--preset", choices=["gsm8k", "math", "plain", "demonstrations"], default="plain",
                        help="demonstrations: free-text expert answers, judged by the RARO critic instead of graded")
    ingest.add_argument("--question-field")
    ingest.add_argument("--answer-field", help="for demonstrations: the expert's answer")
    ingest.add_argument("--reference-field", help="demonstrations: a final answer a verifier can grade, if the data has one")
    ingest.add_argument("--task", help="tag recorded on each problem (default: math, or demonstration)")
    ingest.add_argument("--name", help="source name recorded on each problem")
    ingest.add_argument("--limit", type=int, help="read only the first N rows")
    ingest.add_argument("--subset", help="hub:ORG/NAME: the subset (the hub's config name)")
    ingest.add_argument("--split", help="split of a hub dataset or a `datasets` folder (default: train, or its only one)")
    ingest.add_argument("--config", help="a round config whose eval_sets to decontaminate against")
    ingest.add_argument("--force", action="store_true")
    ingest.set_defaults(func=cmd_ingest)

    rnd = sub.add_parser("round", help="run one round from a config (its `stages`)")
    rnd.add_argument("--run", required=True)
    rnd.add_argument("--config", help="default: the config the run was started with")
    rnd.add_argument("--round", type=int, default=None, help="default: the run's next unfinished round")
    rnd.add_argument("--force", action="store_true")
    rnd.set_defaults(func=cmd_round)

    stage = sub.add_parser("stage", help="rerun one stage of one round")
    stage.add_argument("name", choices=list(STAGES))
    stage.add_argument("--run", required=True)
    stage.add_argument("--round", type=int, default=0)
    stage.add_argument("--config", help="default: the config the run was started with")
    stage.add_argument("--force", action="store_true", help="recompute even if inputs, config and model are unchanged")
    stage.set_defaults(func=cmd_stage)

    evolve = sub.add_parser("evolve", help="K rounds, each from the previous round's checkpoint and grown pool")
    evolve.add_argument("--run", required=True)
    evolve.add_argument("--rounds", type=int, required=True)
    evolve.add_argument("--config", help="default: the run's saved config, else deploy/configs/evolve.yaml")
    evolve.add_argument("--force", action="store_true")
    evolve.set_defaults(func=cmd_evolve)

    report = sub.add_parser("report", help="per-round pool, buckets, variants and held-out pass@k, with a PNG plot")
    report.add_argument("--run", required=True)
    report.add_argument("--out", help="PNG path (default: runs/<run>/report.png)")
    report.set_defaults(func=cmd_report)

    promote = sub.add_parser("promote", help="promote or reject a round's checkpoint by hand (wins over the gate); "
                                              "with no --round, list every decision")
    promote.add_argument("--run", required=True)
    promote.add_argument("--round", type=int, help="the round that trained the checkpoint")
    promote.add_argument("--reject", action="store_true", help="reject it: the next round starts from the last promoted model")
    promote.add_argument("--why", help="the reason, recorded with the decision")
    promote.set_defaults(func=cmd_promote)

    sql = sub.add_parser("sql", help="query a run's tables (or a named query of sql/queries/) with DuckDB")
    sql.add_argument("query")
    sql.add_argument("--run", help="the run to query (or --all-runs)")
    sql.add_argument("--all-runs", action="store_true", help="every run of the lake: the views' `run` column tells them apart")
    sql.add_argument("--as-of", metavar="VERSION|TIME", help="the run as it was at a version of `evoforge history` or a time (UTC)")
    sql.add_argument("--csv", action="store_true")
    sql.add_argument("--allow-writes", action="store_true",
                     help="run statements that write (COPY ... TO, ATTACH, CREATE, ...); by default only reads")
    sql.set_defaults(func=cmd_sql)

    export = sub.add_parser("export", help="a run's tables and training rows as a Hugging Face dataset with its card "
                                           "(a folder, or hub:ORG/NAME)")
    export.add_argument("--run", required=True)
    export.add_argument("--round", type=int, action="append", help="a round to export (repeat it; default: every round)")
    export.add_argument("--table", action="append", required=True,
                        help="a lake table (rollouts, verdicts, pairs, ...) or a method's training rows (sft, dpo, grpo, "
                             "traces, raro, svs, ppm): one config each; repeat it")
    export.add_argument("--to", required=True, help="a folder, or hub:ORG/NAME (token: HF_TOKEN or `hf auth login`)")
    export.add_argument("--format", choices=("arrow", "parquet"),
                        help="arrow: save_to_disk per config (default for a folder); parquet: the hub's layout")
    export.add_argument("--private", action="store_true", help="hub: create the repository private")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    export.add_argument("--license", help="the card's license (default: the config's export.license)")
    export.add_argument("--tag", action="append", help="a tag on the card, besides the config's export.tags")
    export.add_argument("--config", help="the round config (default: the run's saved one)")
    export.set_defaults(func=cmd_export)

    hist = sub.add_parser("history", help="every commit of a run as a version: time, stage, config hash, rows")
    hist.add_argument("--run", required=True)
    hist.set_defaults(func=cmd_history)

    vacuum = sub.add_parser("vacuum", help="remove superseded parts that no checkpoint, evaluation or report refers to "
                                           "(a dry run unless --apply)")
    vacuum.add_argument("--run", required=True)
    vacuum.add_argument("--older-than", required=True, metavar="DURATION",
                        help="only parts superseded longer ago than this: 30d, 12h, 45m, 90s or 0")
    vacuum.add_argument("--apply", action="store_true", help="remove them (default: list what would go)")
    vacuum.set_defaults(func=cmd_vacuum)

    lineage = sub.add_parser("lineage", help="the exact parts a checkpoint trained on")
    lineage.add_argument("checkpoint", help="its checkpoint_id, model_id or path (`evoforge sql --run R checkpoints`)")
    lineage.set_defaults(func=cmd_lineage)

    status = sub.add_parser("status", help="the stage_runs of a run")
    status.add_argument("--run", required=True)
    status.set_defaults(func=cmd_status)

    doctor = sub.add_parser("doctor", help="check every part of a run against its manifest (checksums included)")
    doctor.add_argument("--run", required=True)
    doctor.add_argument("--repair", action="store_true",
                        help="move damaged files aside (runs/<run>/_damaged/) and mark their stages for recomputation")
    doctor.set_defaults(func=cmd_doctor)

    box = sub.add_parser("sandbox", help="run a Python file in the sandbox the way the search runs a step")
    box_sub = box.add_subparsers(dest="sandbox_command", required=True)
    box_run = box_sub.add_parser("run", help="run FILE.py in the sandbox and print its output and status")
    box_run.add_argument("file")
    box_run.add_argument("--wall", type=float, default=5.0, help="deadline in seconds")
    box_run.add_argument("--memory-mb", type=int, default=512)
    box_run.add_argument("--isolation", choices=["namespaces", "rlimits", "auto"], default="namespaces",
                         help="namespaces (bubblewrap; auto: the same) or rlimits: resource limits only, no isolation")
    box_run.set_defaults(func=cmd_sandbox)

    ui = sub.add_parser("ui", help="start the local Prefect server and UI (database inside the project)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=4200)
    ui.add_argument("--database", default=None,
                    help="the Prefect server's database: sqlite (default; in the project's .prefect), postgres (a "
                         "PostgreSQL evoforge runs in the project's .postgres, stopped on exit), or a "
                         "postgresql+asyncpg://USER@HOST/DB URL of an existing server (left running; its password "
                         "from PGPASSWORD or ~/.pgpass, never here: argv is public); default "
                         "$EVOFORGE_PREFECT_DATABASE (which may hold the password), else sqlite")
    ui.add_argument("--postgres-port", type=int, default=5433, help="port of the project's PostgreSQL on 127.0.0.1")
    ui.set_defaults(func=cmd_ui)

    eng = sub.add_parser("engine", help="generation servers")
    eng_sub = eng.add_subparsers(dest="engine_command", required=True)
    eng_serve = eng_sub.add_parser("serve", help="start N local `vllm serve` replicas of a model (Ctrl-C stops them) "
                                                 "and print their endpoints for engine.endpoints")
    eng_serve.add_argument("--model", default="default", help="'default', a model folder or a hub id")
    eng_serve.add_argument("--replicas", type=int, default=1, help="one per GPU, or per group of CPU cores")
    eng_serve.add_argument("--port", type=int, default=8100, help="the first replica's port (the others count up)")
    eng_serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    eng_serve.add_argument("--threads-per-replica", type=int, default=0, help="CPU cores each (0: split evenly)")
    eng_serve.add_argument("--max-model-len", type=int, default=2048)
    eng_serve.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on GPU")
    eng_serve.set_defaults(func=cmd_engine_serve)

    srv = sub.add_parser("serve", help="serve the round and stage deployments (and a cron schedule) from here")
    srv.add_argument("--config", help="round config for the round deployment (default: deploy/configs/demo.yaml)")
    srv.add_argument("--run", default="scheduled", help="the run the deployments work on")
    srv.add_argument("--cron", help="cron expression for scheduled rounds, e.g. '0 */6 * * *'")
    srv.add_argument("--limit", type=int, default=1, help="flow runs at once")
    srv.set_defaults(func=cmd_serve)

    pools = sub.add_parser("pools", help="the cluster's work pools and deployments on the shared Prefect server")
    pools_sub = pools.add_subparsers(dest="pools_command", required=True)
    pools_setup = pools_sub.add_parser("setup", help="create the work pools and deploy deploy/prefect.yaml (default "
                                                     "--all; other options go to `prefect deploy`)")
    pools_setup.set_defaults(func=cmd_pools_setup, passes_options_on=True)

    worker = sub.add_parser("worker", help="start this machine's Prefect worker of a pool (other options go to "
                                           "`prefect worker start`)")
    worker.add_argument("pool", help="gpu or cpu (a pool of deploy/prefect.yaml)")
    worker.add_argument("--name", default=None, help="the worker's name (default POOL-HOSTNAME)")
    worker.set_defaults(func=cmd_worker, passes_options_on=True)

    vf = sub.add_parser("verify-file", help="grade {gold, pred} JSONL lines exactly as the verify stage does")
    vf.add_argument("input")
    vf.add_argument("--out", required=True)
    vf.add_argument("--workers", type=int, default=2)
    vf.add_argument("--deadline", type=float, default=10.0)
    vf.set_defaults(func=cmd_verify_file)
    return p


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command's arguments; `passed_on`: the options `pools setup` and `worker` hand to `prefect deploy` /
    `prefect worker start`. Any other command refuses an option it does not know."""
    command_line = parser()
    args, passed_on = command_line.parse_known_args(argv)
    if passed_on and not getattr(args, "passes_options_on", False):
        command_line.error(f"unrecognized arguments: {' '.join(passed_on)}")
    args.passed_on = passed_on
    return args


@contextmanager
def _sigterm_as_interrupt():
    """`kill` (a supervisor, a timeout) ends a command the way Ctrl-C does: the server `evoforge ui`
    started in its own session and the temporary Prefect server a command starts are shut down,
    instead of being left running without a parent."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


RUN_COMMANDS = ("demo", "ingest", "round", "stage", "evolve")  # commands that run stages, and keep a log file


@contextmanager
def _run_log(args):
    """The whole log of a command that runs stages (Prefect's engine, libraries, evoforge) in
    runs/<run>/logs/; the terminal shows only evoforge's lines (tasks/progress.py TerminalFilter)."""
    import logging

    from evoforge.data.lake import LakeError, lake

    if args.command not in RUN_COMMANDS:
        if args.command == "verify-file":  # a stage's grading outside a flow: its progress lines as the stage shows them
            from prefect.logging.configuration import setup_logging

            setup_logging()
        yield None
        return
    try:
        run_dir = lake().run_dir(args.run)
    except LakeError:  # a bad run name: the command itself says so
        yield None
        return
    starts_run = args.command in ("demo", "ingest") or getattr(args, "config", None)
    if not run_dir.is_dir() and not starts_run:  # no folder for a misspelt run: the command says it does not exist
        yield None
        return
    folder = lake().log_dir(args.run)
    from prefect.logging.configuration import setup_logging

    setup_logging()  # Prefect's first: it leaves the root logger alone once it has a handler of someone else's
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{args.command}-{os.getpid()}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield path
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _lost_server(err: BaseException) -> str | None:
    """The Prefect API URL, when `err` comes from that server no longer answering."""
    import httpx

    url = os.environ.get("PREFECT_API_URL")
    seen = set()
    while err is not None and id(err) not in seen and url:
        seen.add(id(err))
        if isinstance(err, httpx.TransportError):
            return url
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    import logging
    import shlex

    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    started = time.time()
    # a handler that cannot deliver a record (Prefect's API log worker when the server went away)
    # must not print its own error into the terminal; the log file keeps the records
    logging.raiseExceptions = False
    logging.captureWarnings(True)  # libraries' warnings go to the log file, not the terminal
    if args.command not in ("ui", "serve", "engine", "verify-file", "sql", "status", "report", "sandbox", "doctor",
                            "pools", "worker"):
        _use_running_server()
    log_path = None
    try:
        _use_config_lake(args)
        with _sigterm_as_interrupt(), _run_log(args) as log_path:
            code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        import duckdb
        from pydantic import ValidationError

        if isinstance(err, ValidationError) and not os.environ.get("EVOFORGE_TRACEBACK"):
            print(f"error: {_validation_line(err, args)}", file=sys.stderr)
            return 2
        lost = _lost_server(err)
        if lost is not None and not os.environ.get("EVOFORGE_TRACEBACK"):
            # the lake holds every stage that finished: rerunning the same command skips them
            where = f"; finished stages are kept (evoforge status --run {args.run})" if getattr(args, "run", None) else ""
            print(f"error: the Prefect server at {lost} stopped answering{where}; resume with "
                  f"`{shlex.join(['evoforge', *argv])}` once it is back (`evoforge ui`), or without PREFECT_API_URL "
                  f"to run without it", file=sys.stderr)
            return 2
        user_error = isinstance(err, _user_errors() + (ValueError, duckdb.Error))
        from evoforge.flows.dispatch import StageRunFailed

        # a stage that failed on another machine: its line names the flow run to open in the UI
        failed = None if isinstance(err, StageRunFailed) else _failed_stage(getattr(args, "run", None), started)
        if os.environ.get("EVOFORGE_TRACEBACK") or (failed is None and not user_error):
            raise
        log = f" (log: {log_path})" if log_path is not None else ""
        if failed is not None:  # the stage's traceback is in the log file; the round stops with one line
            print(f"error: {failed['stage']} (run {failed['run']}, round {failed['round']}) failed: {failed['error']} "
                  f"(evoforge status --run {failed['run']}; EVOFORGE_TRACEBACK=1 to raise){log}", file=sys.stderr)
        else:
            print(f"error: {str(err).strip().splitlines()[0]}{log}", file=sys.stderr)
        return 2 if user_error else 1
    finally:
        _stop_launched_servers()
    return code if isinstance(code, int) else 0


def _stop_launched_servers() -> None:
    """The `vllm serve` replicas a round launched (engine.launch) end with the command that launched them."""
    servers = sys.modules.get("evoforge.models.vllm_servers")
    if servers is not None:
        servers.stop_all()


def _validation_line(err, args) -> str:
    """A pydantic error as one line naming the option (or config field) and what it allows."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    option = f"--{field.replace('_', '-')}" if first["loc"] and first["loc"][0] in vars(args) else field
    more = f" ({err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{option}: {first['msg'].rstrip('.')}, not {first.get('input')!r}{more}"


def _failed_stage(run: str | None, since: float) -> dict | None:
    """The stage failure this command recorded, if any."""
    if not run:
        return None
    try:
        from evoforge.data.lake import lake

        events = [e for e in lake().read(run, "stage_runs").to_pylist() if e["status"] == "failed"]
    except Exception:
        return None
    latest = max(events, key=lambda e: e["finished_at"], default=None)
    return latest if latest is not None and latest["finished_at"].timestamp() >= since else None


if __name__ == "__main__":
    sys.exit(main())
