"""The docs a newcomer reads: README stays short, its links resolve, every command and option is
documented somewhere in README.md or docs/."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from vecsearch.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(group, prefix: str = "vecsearch") -> list[tuple[str, object]]:
    found = []
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        found.append((path, command))
        if hasattr(command, "commands"):  # a group (typer vendors its own click classes)
            found += _commands(command, path)
    return found


def test_readme_starts_with_the_two_commands_and_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    block = lines[lines.index("```sh") + 1:lines.index("```")]
    assert [line.split()[0:2] for line in block] == [["./dev", "demo"], ["./dev", "test"]]


def test_links_in_the_docs_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_every_command_and_option_is_documented():
    text = "\n".join(doc.read_text() for doc in DOCS)
    root = typer.main.get_command(app)
    commands = _commands(root)
    assert len(commands) > 15  # the db and eval sub-commands too
    missing = []
    for option in root.params:
        missing += [f"vecsearch {o}" for o in option.opts if o.startswith("--") and o not in text]
    for path, command in commands:
        if path not in text:
            missing.append(path)
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help" and opt not in text:
                    missing.append(f"{path} {opt}")
    assert not missing, "not in README.md or docs/: " + ", ".join(missing)


def test_the_module_map_lists_every_module_and_only_those():
    """docs/development.md's layout table is how a newcomer finds a concern: it must match the tree."""
    text = (ROOT / "docs" / "development.md").read_text()
    table = text[text.index("## Layout"):]
    table = table[:table.index("\n\n", table.index("| module |"))]
    listed = set(re.findall(r"`([\w/]+\.py)`", table))
    package = ROOT / "vecsearch"
    present = {str(p.relative_to(package)) for p in package.rglob("*.py")} - {"__init__.py"}
    assert present - listed == set(), "modules missing from docs/development.md's layout table"
    assert listed - present == set(), "docs/development.md lists modules that do not exist"


def test_no_import_cycle_and_no_private_attribute_of_another_module():
    """docs/development.md's layers hold only if no module imports one that imports it back
    (imports inside functions count too) and none reads another's `_private` attribute."""
    import ast

    package = ROOT / "vecsearch"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    imports: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[:len(here.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {t for t in [target, *(f"{target}.{a.name}" for a in node.names)]
                          if t in modules and not name.startswith(t)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                  and node.value.id not in {"self", "cls", "sys", "os"}):
                raise AssertionError(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
        imports[name] = found

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(m == goal or (m not in seen and not seen.add(m) and reaches(m, goal, seen))
                   for m in imports[start])

    cycles = sorted(m for m in modules if reaches(m, m, set()))
    assert not cycles, f"modules in an import cycle: {cycles}"
