# The two-command quick start: `make demo` and `make test`. Each installs what it
# needs first (scripts/setup_env.sh is idempotent and fast when nothing changed).
PY := .venv/bin/python

.PHONY: setup demo test bench clean
setup:
	@scripts/setup_env.sh

demo: setup
	$(PY) -m kvtransfer.demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/transfer_bw.py $(BENCH_ARGS)

clean:
	rm -rf build kvtransfer/_C*.so *.egg-info
