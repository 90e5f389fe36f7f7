# Every Python install goes through constraints.txt (torch==2.13.0): an unpinned torch pulls
# several GB of CUDA wheels onto CPU-only machines.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -c constraints.txt
STAMP  := $(VENV)/.installed
TINY   := models/tiny

.PHONY: install system-deps demo test serve clean bench loadtest

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) -q -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests need (a real redis-server).
system-deps:
	@bash scripts/install-system-deps.sh

$(TINY)/model_index.json: $(STAMP)
	$(BIN)/svd-serve tiny-model $(TINY)

# Install, build the tiny model, generate a clip from the committed sample image.
demo: $(TINY)/model_index.json
	$(BIN)/svd-serve generate --model $(TINY) --image pipelines/assets/sample.png --out out/demo.mp4 \
		--width 256 --height 128 --num-frames 14 --num-inference-steps 8 --seed 42 --dtype fp32 --device cpu

# Tests marked `second_lane` (torch.compile in child processes, long self-contained Ray tests) run in
# a second pytest process beside the rest, whose Ray tests mostly wait: the suite fits 2 cores.
test: $(STAMP) system-deps
	@mkdir -p out
	@$(BIN)/python -m pytest -q -m second_lane -p no:cacheprovider > out/test-second-lane.log 2>&1 & lane=$$!; \
	$(BIN)/python -m pytest -q -m "not second_lane"; main=$$?; \
	wait $$lane; second=$$?; \
	echo "--- second lane (ran beside the rest; log: out/test-second-lane.log) ---"; tail -n 30 out/test-second-lane.log; \
	test $$main -eq 0 -a $$second -eq 0

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py --tiny

clean:
	rm -rf out data models .pytest_cache

# Local single-node deployment: local Ray, the tiny model (unless MODEL=...), local files, SQLite.
serve: $(STAMP)
	$(BIN)/svd-serve up $(if $(MODEL),--model $(MODEL),) --port $(or $(PORT),8000)

# A short Locust profile against a local `svd-serve up` with the tiny model; report in out/loadtest/.
PROFILE ?= smoke
loadtest: $(STAMP)
	$(BIN)/python -m loadtest.run --local --profile loadtest/profiles/$(PROFILE).yaml --out out/loadtest/$(PROFILE)
