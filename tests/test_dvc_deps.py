"""dvc.yaml lists, for each stage, the code it really runs: its module plus every tasks/common and tasks/sources
module it imports (directly or through another), and `model` when it reaches the network. So an edit to one shared
module makes stale only the stages that import it, and an import added without its dvc.yaml line fails here.

The graph counts every import statement in a module, function-level ones included (a stage that imports a module
inside `run()` still runs it). `python -m tests.test_dvc_deps` prints the deps each stage should list;
`python -m tests.test_dvc_deps --write` puts them into dvc.yaml (the code lines of each stage's deps, in place).
"""

from __future__ import annotations

import re
import sys

import yaml

from tests.test_import_graph import ROOT, reached

SHARED = ("tasks/common/", "tasks/sources/")


def code_deps(stage: str) -> list[str]:
    """What the stage's dvc.yaml deps should list as code: its module, the shared modules it reaches, `model`."""
    files = [p.relative_to(ROOT).as_posix() for p in reached(ROOT / "tasks" / f"{stage}.py")]
    shared = sorted(f for f in files if f.startswith(SHARED))
    return [f"tasks/{stage}.py", *shared] + (["model"] if any(f.startswith("model/") for f in files) else [])


def declared_code_deps(entry: dict) -> list[str]:
    deps = [d for d in entry.get("deps", [])]
    return [d for d in deps if d.startswith(("tasks/", "model")) and not d.startswith("data/")]


def test_every_stage_lists_exactly_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    wrong = {
        stage: {"dvc.yaml": declared_code_deps(entry), "imports": code_deps(stage)}
        for stage, entry in stages.items()
        if sorted(declared_code_deps(entry)) != sorted(code_deps(stage))
    }
    assert not wrong, f"dvc.yaml deps differ from the import graph (python -m tests.test_dvc_deps prints them): {wrong}"


def test_a_data_stage_does_not_depend_on_the_trainer():
    assert "tasks/common/trainer.py" not in code_deps("ingest")
    assert "tasks/common/trainer.py" in code_deps("pretrain")


def with_code_deps(text: str) -> str:
    """dvc.yaml's text with each stage's code deps replaced by code_deps(stage); every other line kept."""
    out, stage, in_deps = [], None, False
    for line in text.splitlines(keepends=True):
        if m := re.match(r"^  (\w+):\s*$", line):
            stage, in_deps = m.group(1), False
        if line.strip() == "deps:" and stage:
            out.append(line)
            out += [f"      - {d}\n" for d in code_deps(stage)]
            in_deps = True
            continue
        if in_deps and re.match(r"^      - (tasks/|model\s*$)", line):
            continue
        if in_deps and not line.startswith("      - "):
            in_deps = False
        out.append(line)
    return "".join(out)


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        (ROOT / "dvc.yaml").write_text(with_code_deps((ROOT / "dvc.yaml").read_text()))
    for name in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        print(f"{name}:\n" + "".join(f"  - {d}\n" for d in code_deps(name)))
