"""The task registry is the one place task names are written, and each task's answer layer and
spec import no torch (a server of an ONNX export and the config checks run without it)."""
import ast
import subprocess
import sys
from pathlib import Path

from cvrecipe.tasks import TASKS, task_names

PACKAGE = Path(__file__).resolve().parents[2] / "cvrecipe"


def own_files() -> set[Path]:
    """The registry's package and the modules each task names (its report sections, its routes)."""
    files = set((PACKAGE / "tasks").rglob("*.py"))
    for entry in TASKS.values():
        for module in (entry.report, entry.routes):
            files.add(PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py"))
    return files


def declares_a_models_task(node: ast.Constant, parents: dict) -> bool:
    """`@register("unet", task=...)`: a model says which task its outputs answer."""
    keyword = parents.get(node)
    return isinstance(keyword, ast.keyword) and keyword.arg == "task" and \
        isinstance(parents.get(keyword), ast.Call) and getattr(parents[keyword].func, "id", "") == "register"


def test_task_names_appear_only_in_the_registry_and_the_tasks_own_files():
    names, allowed, found = set(task_names()), own_files(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if path in allowed or not any(name in text for name in names):
            continue
        tree = ast.parse(text)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} '{node.value}'" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names
                  and not declares_a_models_task(node, parents)]
    assert not found, "task names outside the task registry (use the task object or cvrecipe.tasks):\n" + \
                      "\n".join(found)


def test_the_check_sees_a_task_name(tmp_path):
    tree = ast.parse(f"if meta.get('task') == {task_names()[0]!r}: pass")
    assert any(isinstance(n, ast.Constant) and n.value in task_names() for n in ast.walk(tree))


def test_answer_layers_specs_and_config_import_no_torch():
    modules = [m for e in TASKS.values() for m in (e.answers, e.spec)] + ["cvrecipe.config"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "from cvrecipe.config import load_config\nload_config(None, ['task=segmentation', 'data.name=masks:x'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
