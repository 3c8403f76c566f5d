"""The Colab notebooks (colab/*.ipynb): committed as colab/make_notebooks.py writes them, and each one runs
top to bottom on the CPU (with PETFM_NOTEBOOK_SMOKE=1, which its parameters cell reads to shrink the run)."""

import importlib.util
import os
import pathlib

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
COLAB = REPO / "colab"
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))


def _generator():
  spec = importlib.util.spec_from_file_location("make_notebooks", COLAB / "make_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_committed_notebooks_are_the_generators_output():
  generator = _generator()
  assert NOTEBOOKS == sorted(generator.NOTEBOOKS)
  for name in NOTEBOOKS:
    assert (COLAB / name).read_text() == generator.render(name), f"{name}: run python colab/make_notebooks.py"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_layout(name):
  nb = nbformat.read(COLAB / name, as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown"
  url = f"https://colab.research.google.com/github/petfm-org/petfm/blob/main/colab/{name}"
  assert url in nb.cells[0].source
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.outputs == [] and c.execution_count is None for c in code)
  assert [c for c in code if "parameters" in c.metadata.get("tags", [])] != []
  assert "PETFM_NOTEBOOK_SMOKE" in next(c for c in code if "parameters" in c.metadata.get("tags", [])).source


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A `python3` kernelspec for this interpreter (so the kernel imports what the tests import) and the
  kernel's environment: CPU, this checkout, smoke-sized parameters, a compile cache shared by the
  notebooks."""
  from ipykernel.kernelspec import write_kernel_spec
  root = tmp_path_factory.mktemp("jupyter")
  write_kernel_spec(str(root / "kernels" / "python3"))
  env = {
      "JUPYTER_PATH": str(root), "JAX_PLATFORMS": "cpu",
      # 2 devices (a real mesh); cheaper CPU code generation (these runs check that the notebooks work)
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                   "--xla_llvm_disable_expensive_passes=true",
      "PETFM_REPO": str(REPO), "PETFM_NOTEBOOK_SMOKE": "1",
      "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
      "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "MPLBACKEND": "module://matplotlib_inline.backend_inline", "TQDM_DISABLE": "1",
  }
  return env


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name, kernel_env, tmp_path, monkeypatch):
  from nbclient import NotebookClient
  for key, value in kernel_env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(COLAB / name, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()                                     # raises CellExecutionError on the first failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, f"{name} shows no figure"
  assert not any(p.name.startswith("petfm_") for p in REPO.iterdir()), "a notebook wrote into the checkout"
