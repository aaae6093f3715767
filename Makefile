# vmmig developer entry points. Every target creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-test

.PHONY: demo test test-full soak lint docs bench bench-quick fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(STAMP)  ## generate a 256 MiB guest image and migrate it over 127.0.0.1 with live progress
	$(BIN)/python examples/demo.py --size 256MiB

test: $(STAMP)  ## lint, then the test suite (under 10 minutes)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

test-full: $(STAMP)  ## every test, the slow ones too, then the full soak
	$(BIN)/python -m pytest -q
	$(BIN)/python tests/soak.py --runs 200

soak: $(STAMP)  ## 200 migrations of small images, a random fault each; prints the seed that replays a failure
	$(BIN)/python tests/soak.py --runs 200

docs: $(STAMP)  ## regenerate docs/CLI.md's usage and option tables and docs/man/*.1 from the click definitions
	$(BIN)/python -m migrate_cli.cli.docgen

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true

bench: $(STAMP)  ## benchmarks (not part of make test): throughput/RSS vs socat baselines, live migration
	$(BIN)/python -m pip install --quiet --disable-pip-version-check py-spy  # bench_gil.py samples with it
	$(BIN)/python -m compileall -q migrate_cli  # as an installed package: no per-run compile in start-up times
	$(BIN)/python benchmarks/bench_transfer.py
	$(BIN)/python benchmarks/bench_live.py
	$(BIN)/python benchmarks/bench_tls.py
	$(BIN)/python benchmarks/bench_cap.py
	$(BIN)/python benchmarks/bench_qemu.py
	$(BIN)/python benchmarks/bench_qemu_live.py
	$(BIN)/python benchmarks/bench_resume.py
	$(BIN)/python benchmarks/bench_auto.py
	$(BIN)/python benchmarks/bench_gil.py
	$(BIN)/python benchmarks/bench_ssh.py
	$(BIN)/python benchmarks/bench_snapshot.py --with-qemu
	$(BIN)/python benchmarks/bench_snapshot_damage.py
	$(BIN)/python benchmarks/bench_libvirt.py

bench-quick: $(STAMP)  ## a smoke run of every benchmark
	$(BIN)/python -m pip install --quiet --disable-pip-version-check py-spy  # bench_gil.py samples with it
	$(BIN)/python -m compileall -q migrate_cli
	$(BIN)/python benchmarks/bench_transfer.py --quick
	$(BIN)/python benchmarks/bench_live.py --quick
	$(BIN)/python benchmarks/bench_tls.py --quick
	$(BIN)/python benchmarks/bench_cap.py --quick
	$(BIN)/python benchmarks/bench_resume.py --quick
	$(BIN)/python benchmarks/bench_auto.py --quick
	$(BIN)/python benchmarks/bench_gil.py --quick
	$(BIN)/python benchmarks/bench_ssh.py --quick
	$(BIN)/python benchmarks/bench_snapshot.py --quick

fuzz: $(STAMP)  ## fuzz the sans-IO decoder for 10 minutes (atheris if it installs, else hypothesis)
	-$(BIN)/python -m pip install --quiet --disable-pip-version-check atheris
	$(BIN)/python fuzz/fuzz_decoder.py --seconds 600

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
