# `make demo` and `make test` work on a fresh machine: `setup` installs what is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PKGS := libfluidsynth3 fluid-soundfont-gm timgm6mb-soundfont
DEMO_OUT ?= demo_out

.PHONY: setup demo test test-fast bench clean

setup: $(BIN)/.installed
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[synth,dev]'
	touch $@

demo: setup
	$(BIN)/wss-ray pipeline --config configs/demo.yaml --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -x -q -rs --durations=15 tests

# the inner loop: everything that needs neither Ray nor minutes of rendering or training
test-fast: setup
	$(BIN)/python -m pytest -x -q -rs -m "not ray and not slow" tests

BENCH_OUT ?= bench_out
DEMO_CKPT ?= $(DEMO_OUT)/checkpoints/finetune-c-h-aml/checkpoint
bench: setup
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_separate.py $(if $(wildcard $(DEMO_CKPT)),--checkpoint $(DEMO_CKPT))
	$(BIN)/wss-ray data synth --out $(BENCH_OUT)/corpus --tracks 24 --seconds 16 --seed 7
	$(BIN)/wss-ray data featurize --slakh $(BENCH_OUT)/corpus --out $(BENCH_OUT)/features --config configs/demo.yaml
	$(BIN)/python benchmarks/bench_stages.py --data $(BENCH_OUT)/features --config configs/demo.yaml

clean:
	rm -rf $(DEMO_OUT) $(BENCH_OUT) runs .pytest_cache
