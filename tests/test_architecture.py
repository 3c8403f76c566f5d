"""The seams between packages: which package may import which (docs/architecture.md, "Layers")."""

import ast
import pathlib

from conftest import REPO

# package (folder under the repository root) → the first-party packages it must never import
FORBIDDEN = {
    "petfm": ("data_prep", "experiments", "benchmarks", "tests"),
    "petfm/data": ("petfm.train", "petfm.downstream", "petfm.seganypet"),
    "petfm/models": ("petfm.train", "petfm.downstream", "petfm.seganypet"),
}


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module named by an import statement in `path`, also imports inside functions."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_no_import_against_the_layering():
  root = pathlib.Path(REPO)
  wrong = []
  for package, forbidden in FORBIDDEN.items():
    for path in sorted((root / package).rglob("*.py")):
      for name in sorted(imported_modules(path)):
        if any(name == f or name.startswith(f + ".") for f in forbidden):
          wrong.append(f"{path.relative_to(root)} imports {name}")
  assert not wrong, "\n".join(wrong)
