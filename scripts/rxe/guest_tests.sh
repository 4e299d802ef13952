#!/usr/bin/env bash
# scripts/rxe/guest_tests.sh [PYTEST ARGS...]      (runs INSIDE the rxe guest; part of `make test`)
#
# The engine's transfer tests over verbs, forced, on rxe0 (the same tests tcp and shm
# pass, sized for an emulated NIC), then the verbs-only tests: interoperability with
# pyverbs, bad input, a control-plane pull over verbs, and last a device that disappears (it deletes rxe0 and makes
# it again). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
export KVTRANSFER_TEST_TRANSPORTS=verbs KVTRANSFER_TEST_RXE_NETDEV=veth0
PY=${PY:-.venv/bin/python}
exec timeout 1200 "$PY" -m pytest -q -p no:cacheprovider -o console_output_style=classic "$@" \
    tests/test_read.py \
    "tests/test_refusals.py::test_refusal_names_entry_errno_and_transport" \
    tests/test_refusals.py::test_refusals_one_after_another_on_one_peer \
    tests/test_refusals.py::test_deregistered_region_is_refused \
    tests/test_failures.py::test_sigkill_mid_transfer \
    tests/test_failures.py::test_engine_usable_after_target_died \
    tests/test_verbs_interop.py \
    tests/test_verbs_errors.py \
    tests/test_control.py::test_pull_lands_the_requests_kv \
    tests/test_tcp_tokens.py::test_verbs_setup_rides_on_the_token \
    tests/test_verbs_device_loss.py
