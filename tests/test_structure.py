"""The shape of the codebase: one import name, no import cycles, a stage registry the config, the
CLI, the lake and the catalog agree with."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from evoforge.data import home, schemas

PACKAGES = ("app", "data", "flows", "models", "tasks")


def project_modules() -> list[str]:
    root = home.PROJECT_ROOT
    names = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names.append(".".join(("evoforge", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module is imported first, alone: a cycle hidden by import order anywhere else fails here.
    One interpreter loads the third-party libraries once, then forks a fresh child per module, in
    which no evoforge module has been imported yet."""
    script = textwrap.dedent("""
        import os, sys, importlib, traceback
        import pyarrow, pyarrow.compute, pyarrow.parquet, duckdb, pydantic, prefect, yaml, torch, math_verify  # not evoforge
        def child(name):
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        failed, running, waiting = [], {}, list(sys.argv[1:])
        while waiting or running:
            while waiting and len(running) < (os.cpu_count() or 1):
                name = waiting.pop()
                pid = os.fork()
                if pid == 0:
                    child(name)
                running[pid] = name
            pid, status = os.wait()
            if status:
                failed.append(running[pid])
            del running[pid]
        print("FAILED:" + ",".join(sorted(failed)))
    """)
    modules = project_modules()
    assert "evoforge.flows.stages" in modules and "evoforge.tasks.finetune.training" in modules
    done = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=300,
                          cwd=home.PROJECT_ROOT / "tests")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "FAILED:", done.stderr[-3000:]


def evoforge_imports() -> dict[str, set[str]]:
    """module -> the evoforge modules it imports, at module level or inside functions. An import under
    `if TYPE_CHECKING:` is a type checker's, never run (a method module names FinetuneConfig, which
    holds the method's section, for its annotations only), so it is no edge."""
    import ast

    modules = set(project_modules())
    graph: dict[str, set[str]] = {}
    for name in modules:
        path = home.PROJECT_ROOT.joinpath(*name.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        graph[name] = set()
        tree = ast.parse(path.read_text())
        for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
            block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evoforge"):
                graph[name] |= {n for n in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if n in modules}
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
    return graph


@pytest.mark.unit
def test_no_module_imports_a_layer_by_its_bare_name():
    """`from tasks.critic import ...` works under pytest (the checkout's root is on sys.path) and fails from the
    installed `evoforge` command (ModuleNotFoundError): every import of evoforge's own code names `evoforge.`,
    at module level or inside a function."""
    import ast

    root = home.PROJECT_ROOT
    bare = {*PACKAGES, "sql", "deploy"}
    files = [root / "__init__.py", root / "__main__.py", *(p for package in PACKAGES for p in (root / package).rglob("*.py"))]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [f"{path.relative_to(root)}:{node.lineno}: {name}" for name in names if name.split(".")[0] in bare]
    assert len(files) > 50 and found == []


@pytest.mark.unit
def test_no_import_cycles_and_the_layers_point_one_way():
    """data <- models <- tasks <- flows <- app: storage knows nothing of engines, stages or flows, a flow
    nothing of the command line; no stage flow
    imports another; and no cycle, not even through an import inside a function."""
    graph = evoforge_imports()
    layer = {"data": 0, "models": 1, "tasks": 2, "flows": 3, "app": 4}
    upward = [(m, t) for m, targets in graph.items() for t in targets if layer[t.split(".")[1]] > layer[m.split(".")[1]]]
    assert upward == []
    stage_flows = {f"evoforge.flows.{name}" for name in ("ingest", "generate", "verify", "filter", "synthesize", "mcts",
                                                         "critic", "pairs", "finetune", "evaluate")}
    assert [(m, t) for m in stage_flows for t in graph[m] if t in stage_flows] == []

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in graph[node]:
                if target == start:
                    return path + [start]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
        return None

    assert [c for m in graph if (c := cycle_from(m))] == []


@pytest.mark.unit
def test_stages_in_tasks_are_plain_functions_and_prefect_stays_in_flows():
    """No module under tasks/ imports Prefect when it is imported: a stage is a plain function that tests,
    benches and training processes call without Prefect; flows/prefect_tasks.py makes the Prefect tasks.
    The one import inside a function is progress.py's run logger (inside a flow run its lines go to the UI)."""
    import ast

    root = home.PROJECT_ROOT

    def prefect_imports(node: ast.AST, in_function: bool = False):
        for child in ast.iter_child_nodes(node):
            names = ([a.name for a in child.names] if isinstance(child, ast.Import)
                     else [child.module or ""] if isinstance(child, ast.ImportFrom) and child.level == 0 else [])
            if any(n == "prefect" or n.startswith("prefect.") for n in names):
                yield child.lineno, in_function
            yield from prefect_imports(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                               ast.Lambda)))

    module_level, in_functions = [], []
    files = sorted((root / "tasks").rglob("*.py"))
    for path in files:
        for lineno, in_function in prefect_imports(ast.parse(path.read_text())):
            (in_functions if in_function else module_level).append(f"{path.relative_to(root)}:{lineno}")
    assert len(files) > 20
    assert module_level == []
    assert [where.split(":")[0] for where in in_functions] == ["tasks/progress.py"]


@pytest.mark.unit
def test_evoforge_lives_beside_a_users_own_models_and_data_packages(scratch):
    """Installed evoforge takes one top-level name: a user's `models` and `data` packages stay theirs."""
    for name in ("models", "data"):
        (scratch / name).mkdir()
        (scratch / name / "__init__.py").write_text(f"WHOSE = 'the user {name}'\n")
    script = ("import models, data, evoforge.models.engine, evoforge.data.lake\n"
              "print(models.WHOSE, '|', data.WHOSE, '|', evoforge.models.engine.__name__, evoforge.data.lake.Lake.__name__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=scratch, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "the user models | the user data | evoforge.models.engine Lake"


@pytest.mark.unit
def test_the_stage_registry_is_what_the_config_the_cli_and_the_lake_agree_on():
    from evoforge.app.cli import parser
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.round import STAGE_FLOWS
    from evoforge.flows.stages import REGISTRY, ROUND_STAGES, STAGES

    # one config section per round stage, in round order, each of its registered class
    sections = [name for name in RoundConfig.model_fields if name in STAGES]
    assert sections == list(ROUND_STAGES)
    for name in sections:
        assert RoundConfig.model_fields[name].annotation is STAGES[name].section
    # the CLI offers exactly the registered stages
    stage_parser = parser()._subparsers._group_actions[0].choices["stage"]
    choices = next(a.choices for a in stage_parser._actions if a.dest == "name")
    assert list(choices) == list(STAGES)
    # every table a stage reads is written by a stage (an earlier one, or one of an earlier round: mcts
    # reads the PPM that the round before registered in checkpoints)
    written = {table for stage in REGISTRY for table in stage.writes}
    for stage in REGISTRY:
        assert set(stage.writes) <= set(schemas.ROUND_TABLES), stage.name
        assert set(stage.reads) <= written, (stage.name, set(stage.reads) - written)
        assert callable(STAGE_FLOWS[stage.name]) and callable(stage.summarize)
    assert list(STAGE_FLOWS) == list(STAGES)
    # every table is written by some stage and has its view
    views = {p.stem for p in (home.PROJECT_ROOT / "sql" / "views").glob("*.sql")}
    assert written == set(schemas.ROUND_TABLES) and set(schemas.ROUND_TABLES) | set(schemas.RUN_TABLES) <= views


@pytest.mark.unit
def test_a_stage_summary_reads_its_own_output_tables():
    import pyarrow as pa

    from evoforge.flows.artifacts import stage_markdown

    rollouts = pa.table({"completion_tokens": [3, 4], "finish_reason": ["stop", "length"]})
    text = stage_markdown("generate", 2, "completed", {"rollouts": rollouts})
    assert text.splitlines() == ["### generate, round 2 (completed)", "",
                                 "- **rollouts**: 2, **tokens**: 7", "- **finish reasons**: length 1, stop 1"]


@pytest.mark.unit
def test_every_file_is_written_through_the_atomic_helper():
    """Hand-rolled temporary names escape the sweep of leftovers (data/atomic.py): none may exist."""
    offenders = []
    for package in PACKAGES:
        for path in (home.PROJECT_ROOT / package).rglob("*.py"):
            if path.name == "atomic.py":
                continue
            text = path.read_text()
            for pattern in ("os.replace(", ".tmp-", "uuid.uuid4().hex}.tmp", ".staging-"):
                if pattern in text:
                    offenders.append(f"{path.relative_to(home.PROJECT_ROOT)}: {pattern}")
    assert offenders == []


@pytest.mark.slow
def test_a_regular_install_carries_its_sql_configs_and_data_sets_and_writes_outside_site_packages(scratch):
    """The wheel (what `pip install evoforge` installs) holds every subpackage and the files evoforge reads
    at run time; installed that way, its home is the user's data folder: not site-packages, and not the working
    folder (where a planted `.prefect/server.json` would choose the API its commands talk to)."""
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(scratch / "wheel"), str(home.PROJECT_ROOT)],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INDEX": "1"})
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (scratch / "wheel").glob("evoforge-*.whl")
    site, work = scratch / "site", scratch / "work"
    work.mkdir()
    zipfile.ZipFile(wheel).extractall(site)
    script = ("from evoforge.data import catalog, home\n"
              "from evoforge.flows.config import DEFAULT_CONFIG, load_config\n"
              "import evoforge.tasks.finetune.training\n"
              "print(home.SOURCE_CHECKOUT, home.home(), load_config(DEFAULT_CONFIG).stages, sorted(catalog.named_queries())[:2],"
              " sum(1 for _ in home.SHIPPED_SETS.rglob('*.jsonl')))")
    env = {key: value for key, value in os.environ.items() if key != "EVOFORGE_HOME"}
    env.update(PYTHONPATH=str(site), XDG_DATA_HOME=str(scratch / "data"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=work, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", str((scratch / "data" / "evoforge").resolve()), "['generate',", "'verify',",
                                   "'filter']", "['buckets',", "'by_source']", "6"]
    chosen = subprocess.run([sys.executable, "-c", "from evoforge.data import home; print(home.home())"], cwd=work,
                            capture_output=True, text=True, timeout=120, env={**env, "EVOFORGE_HOME": str(work)})
    assert chosen.stdout.split() == [str(work.resolve())]  # the user's choice wins


@pytest.mark.unit
def test_one_command_line_passes_prefects_own_options_only_to_pools_setup_and_worker(capsys):
    """The cluster's set-up and workers are `evoforge` commands (deploy/cluster/*.sh call them); the options
    they do not know go to `prefect deploy` / `prefect worker start`, and any other command refuses them."""
    from evoforge.app.cli import parse_arguments

    worker = parse_arguments(["worker", "gpu", "--name", "gpu-1", "--limit", "2"])
    assert (worker.pool, worker.name, worker.passed_on) == ("gpu", "gpu-1", ["--limit", "2"])
    setup = parse_arguments(["pools", "setup", "--name", "stage_flow/gpu"])
    assert setup.passed_on == ["--name", "stage_flow/gpu"]
    with pytest.raises(SystemExit) as refused:
        parse_arguments(["status", "--run", "r", "--limit", "2"])
    assert refused.value.code == 2 and "unrecognized arguments: --limit 2" in capsys.readouterr().err
    for script in ("setup.sh", "worker.sh"):
        last = (home.PROJECT_ROOT / "deploy" / "cluster" / script).read_text().strip().splitlines()[-1]
        assert last.startswith('exec "$python" -m evoforge ')
