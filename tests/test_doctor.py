"""``kvtransfer doctor``: run as a command (subprocess, with deadlines) and checked
against what this process finds itself through the same extension, so the facts it
prints are the machine's, whatever the machine: on a host without RDMA or CUDA
(CI) it must say "no device" and "unavailable" with the reasons; in the soft-RoCE
guest (scripts/rxe/) it must list rxe0 and offer verbs.

The peer checks use a live ``python -m kvtransfer.testing.target`` (the ``start_target``
fixture: its JSON line is read with a deadline, and it is stopped at teardown).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvtransfer import TRANSPORTS, Engine, _C
from kvtransfer.doctor import RULE, decode_rate, gid_text, rate_text, rdma_via_extension

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 120.0  # one doctor run takes ~0.5 s here; the rxe guest under TCG is far slower
SECTIONS = ("Build", "RDMA", "CUDA", "Engine", "Exposure")


def run(*args: str, env: dict[str, str] | None = None, module: str = "kvtransfer",
        subcommand: tuple[str, ...] = ("doctor",)) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "KVTRANSFER_TRANSPORT"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ else []))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *subcommand, *args], capture_output=True, text=True,
                          timeout=DEADLINE_S, cwd=ROOT, env=e)


def ok(*args: str, **kw) -> str:
    p = run(*args, **kw)
    assert p.returncode == 0, f"doctor {args} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout


def sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """perftest-style text -> {section title: [(key, value), ...]} (keys unindented,
    in order, repeats kept)."""
    lines = text.splitlines()
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for i, line in enumerate(lines):
        if line == RULE:
            continue
        if i > 0 and lines[i - 1] == RULE and i + 1 < len(lines) and lines[i + 1] == RULE:
            current = line.split("  (")[0].strip()
            out[current] = []
            continue
        m = re.match(r"^ \s*(\S.*?)\s*: (.*)$", line)
        assert m and current, f"not a 'key : value' line: {line!r}"
        out[current].append((m[1], m[2]))
    return out


def values(sec: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in sec if k == key]


def one(sec: list[tuple[str, str]], key: str) -> str:
    got = values(sec, key)
    assert len(got) == 1, f"expected one {key!r} line, got {got} in {sec}"
    return got[0]


@pytest.fixture(scope="module")
def here() -> dict:
    """What this process finds through the extension: what the doctor must report."""
    try:
        devices, devices_error = _C.verbs_devices(), None
    except Exception as e:
        devices, devices_error = None, str(e)
    with Engine() as eng:
        verbs_why = eng.verbs_unavailable
    cuda_ok, cuda_why = _C.cuda_available()
    return {"devices": devices, "devices_error": devices_error, "verbs_why": verbs_why, "cuda_ok": cuda_ok,
            "cuda_why": cuda_why}


@pytest.fixture(scope="module")
def text_report() -> str:
    return ok()


@pytest.fixture(scope="module")
def json_report() -> dict:
    out = ok("--json")
    assert out.count("\n") == 1, "--json prints one line: one JSON object"
    return json.loads(out)


# --- what the machine can do ---------------------------------------------------------------

def test_sections_in_order(text_report):
    secs = sections(text_report)
    assert list(secs) == list(SECTIONS)
    assert "Peer" not in secs  # only with --peer / --peer-hex


def test_build(text_report, json_report, here):
    b = sections(text_report)["Build"]
    import kvtransfer
    assert one(b, "kvtransfer").startswith(f"{kvtransfer.__version__} (")
    assert one(b, "extension") == _C.__file__ and Path(one(b, "extension")).is_file()
    without = here["verbs_why"] is not None and "built without libibverbs headers" in here["verbs_why"]
    assert one(b, "verbs compiled in") == (f"no: {here['verbs_why']}" if without else "yes")
    assert json_report["build"]["verbs_compiled_in"] is (not without)
    assert json_report["build"]["extension"] == _C.__file__
    try:
        import pyverbs  # noqa: F401
    except ImportError:
        assert one(b, "pyverbs").startswith("not importable (")
        assert json_report["build"]["pyverbs"] is None


def test_rdma(text_report, json_report, here):
    r = sections(text_report)["RDMA"]
    j = json_report["rdma"]
    if here["devices_error"] is not None:  # this host: no RDMA in the kernel
        assert one(r, "devices") == "none"
        assert one(r, "reason") == here["devices_error"]
        assert here["devices_error"] in (here["verbs_why"] or "")
        assert j["devices"] == [] and j["reason"] == here["devices_error"]
        assert values(r, "device") == [] and values(r, "port 1") == []
    else:
        names = [d["name"] for d in here["devices"]]
        assert [d["name"] for d in j["devices"]] == names
        if names:
            assert one(r, "devices").startswith(f"{len(names)} (")
        else:  # libibverbs works but lists no device (a GPU machine without an RDMA NIC)
            assert one(r, "devices") == "none"
        for name in names:
            assert any(v.startswith(f"{name} ") or v == name for v in values(r, "device"))


def test_rdma_no_device_reason_on_this_host(json_report, here):
    """This project's CI host has no RDMA: the reason must say what is missing."""
    if here["devices_error"] is None:
        pytest.skip("this machine has RDMA devices")
    assert json_report["rdma"]["source"] in ("kvtransfer._C.verbs_devices", "pyverbs")
    reason = json_report["rdma"]["reason"]
    assert "ibv_get_device_list" in reason or "libibverbs" in reason, reason


def test_cuda(text_report, json_report, here):
    c = sections(text_report)["CUDA"]
    j = json_report["cuda"]
    assert j["available"] is bool(here["cuda_ok"])
    if not here["cuda_ok"]:
        assert "libcuda" in here["cuda_why"]
        assert one(c, "driver") == f"unavailable: {here['cuda_why']}"
        assert j["reason"] == here["cuda_why"] and j["devices"] == []
        assert "dma-buf export" not in dict(c)
    else:
        assert one(c, "driver") == "libcuda.so.1 loaded"
    assert one(c, "nvidia-peermem") in ("loaded", "not loaded")


def test_engine(text_report, json_report, here):
    e = sections(text_report)["Engine"]
    names = [t["name"] for t in json_report["engine"]["transports"]]
    assert json_report["engine"]["table"] == list(TRANSPORTS)
    if here["verbs_why"] is None:
        assert names == ["verbs", "map", "shm", "tcp"]
        assert re.fullmatch(r"yes: \S+ port \d+, GID index \d+ \(\S+\)", one(e, "verbs"))
        assert one(e, "offers") == "verbs, map, shm, tcp"
    else:
        assert names == ["map", "shm", "tcp"]
        assert one(e, "verbs") == f"no: {here['verbs_why']}"
        assert json_report["engine"]["verbs_unavailable"] == here["verbs_why"]
        assert one(e, "offers") == "map, shm, tcp"
    assert one(e, "map") == "yes: same-host peers' shared memory (0 such regions registered here)"
    assert one(e, "shm").startswith("yes: same-host peers (boot id ")
    assert re.fullmatch(r"yes: listening on 127\.0\.0\.1:\d+", one(e, "tcp"))
    tcp = json_report["engine"]["transports"][-1]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", tcp["listen"]) and int(tcp["listen"].split(":")[1]) > 0


def test_listen_host_option():
    j = json.loads(ok("--json", "--listen-host", "0.0.0.0"))
    assert j["engine"]["transports"][-1]["listen"].startswith("0.0.0.0:")


def test_module_entry_points(text_report):
    """``python -m kvtransfer.doctor`` gives the same report as ``python -m kvtransfer doctor``."""
    other = ok(module="kvtransfer.doctor", subcommand=())
    assert list(sections(other)) == list(SECTIONS)
    assert dict(sections(other)["Build"]) == dict(sections(text_report)["Build"])


# --- a peer ---------------------------------------------------------------------------------

#: Under TCG in the soft-RoCE guest a target needs over a minute to start (support.py's
#: default deadline is 30 s).
PEER_STARTUP_S = 180.0


@pytest.fixture
def peer(start_target):
    return start_target(1 << 20, startup_timeout=PEER_STARTUP_S)


def expected_pick(here) -> str:
    """Both engines live here: verbs when this machine has it (the rxe guest), else map
    (the target holds its bytes in shared memory)."""
    return "verbs" if here["verbs_why"] is None else "map"


def test_peer_pick_and_connect(peer, here):
    hexdesc = peer.engine.to_bytes().hex()
    secs = sections(ok("--peer-hex", hexdesc, "--connect"))
    assert list(secs) == [*SECTIONS, "Peer"]
    p = secs["Peer"]
    pick = expected_pick(here)
    assert one(p, "pick") == pick
    assert one(p, "candidates") == ("verbs, map, shm, tcp" if pick == "verbs" else "map, shm, tcp")
    assert one(p, "same host") == "yes"
    assert one(p, "forced") == "no"
    assert one(p, "tcp") == f"{peer.engine.tcp_host}:{peer.engine.tcp_port}"
    assert f"pid {peer.pid}" in one(p, "host")
    if pick == "map":
        assert one(p, "why").startswith(f"same host (boot id {peer.engine.boot_id}")
        assert one(p, "why").endswith("1 region in shared memory, mapped and copied with memcpy")
        assert one(p, "not verbs") == f"this engine has no verbs: {here['verbs_why']}"
    assert one(p, "connect") == f"ok: peer.transport = {pick}"
    assert any(f"via {pick}" in v for v in values(p, "log"))
    peer.ping()  # the target lived through it


def test_peer_forced_tcp_by_environment(peer):
    hexdesc = peer.engine.to_bytes().hex()
    p = sections(ok("--peer-hex", hexdesc, "--connect", env={"KVTRANSFER_TRANSPORT": "tcp"}))["Peer"]
    assert one(p, "forced") == "tcp (by KVTRANSFER_TRANSPORT)"
    assert one(p, "candidates") == "tcp"
    assert one(p, "pick") == "tcp"
    assert one(p, "why") == "forced by KVTRANSFER_TRANSPORT=tcp"
    assert one(p, "connect") == "ok: peer.transport = tcp"


def test_peer_json(peer, here):
    hexdesc = peer.engine.to_bytes().hex()
    j = json.loads(ok("--json", "--peer-hex", hexdesc, "--connect"))
    p = j["peer"]
    assert p["descriptor"]["engine_id"] == peer.engine.engine_id.hex()
    assert p["same_host"] is True and p["forced"] is None and p["error"] is None
    assert p["pick"] == expected_pick(here) == p["candidates"][0] == p["connect"]["transport"]
    assert p["candidates"][-2:] == ["shm", "tcp"]
    assert p["connect"]["error"] is None
    j = json.loads(ok("--json", "--peer-hex", hexdesc, "--connect", env={"KVTRANSFER_TRANSPORT": "tcp"}))
    assert j["peer"]["candidates"] == ["tcp"] and j["peer"]["connect"]["transport"] == "tcp"
    assert j["peer"]["forced_by"] == "KVTRANSFER_TRANSPORT"


def test_peer_file_and_transport_option(peer, here, tmp_path):
    f = tmp_path / "peer.bin"
    f.write_bytes(peer.engine.to_bytes())
    p = sections(ok("--peer", str(f), "--transport", "tcp"))["Peer"]
    assert one(p, "pick") == "tcp" and one(p, "forced") == "tcp (by --transport)"
    assert "connect" not in dict(p)  # no --connect: nothing was tried
    h = tmp_path / "peer.hex"  # the hex text kvtransfer.testing.target prints works too
    h.write_text(peer.engine.to_bytes().hex() + "\n")
    assert one(sections(ok("--peer", str(h)))["Peer"], "pick") == expected_pick(here)


def test_peer_forced_transport_that_cannot_run(peer, here):
    """A forced transport that cannot run is reported, with why; still exit 0."""
    if here["verbs_why"] is None:
        pytest.skip("verbs works here")
    hexdesc = peer.engine.to_bytes().hex()
    p = sections(ok("--peer-hex", hexdesc, "--connect", env={"KVTRANSFER_TRANSPORT": "verbs"}))["Peer"]
    assert one(p, "pick") == "none"
    assert one(p, "error").startswith("TransportUnavailableError: connect: forced transport verbs is unavailable: "
                                      f"this engine has no verbs: {here['verbs_why']}")
    assert one(p, "connect").startswith("failed: TransportUnavailableError: connect: forced transport verbs")
    p = sections(ok("--peer-hex", hexdesc, env={"KVTRANSFER_TRANSPORT": "carrier-pigeon"}))["Peer"]
    assert "unknown transport 'carrier-pigeon'" in one(p, "error")


# --- wrong arguments: exit 2 ------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (("--peer-hex", "zz"), "not hex"),
    (("--peer-hex", "abcd"), "malformed EngineDescriptor"),
    (("--peer", "/nonexistent/peer.bin"), "No such file"),
    (("--connect",), "--connect needs --peer or --peer-hex"),
    (("--transport", "smoke-signals"), "invalid choice"),
    (("--peer-hex", "00", "--peer", "x"), "not allowed with"),
    (("--no-such-option",), "unrecognized arguments"),
])
def test_wrong_arguments(args, says):
    p = run(*args)
    assert p.returncode == 2, p
    assert says in p.stderr and p.stdout == ""


def test_cli_dispatch():
    p = run(subcommand=())
    assert p.returncode == 2 and "usage: kvtransfer COMMAND" in p.stderr and "doctor" in p.stderr
    p = run(subcommand=("frobnicate",))
    assert p.returncode == 2 and "unknown command 'frobnicate'" in p.stderr
    p = run("--help")
    assert p.returncode == 0 and "usage: kvtransfer doctor" in p.stdout


# --- decoding, in process ---------------------------------------------------------------------

def _gid(index: int, text: str, rocev2: bool) -> dict:
    import ipaddress
    return {"index": index, "raw": ipaddress.IPv6Address(text).packed, "rocev2": rocev2}


#: What the extension returns in the soft-RoCE guest (scripts/rxe/), abridged, with a
#: second (InfiniBand) device and one that cannot be opened.
RXE_DEVICES = [
    {"name": "rxe0", "fw": "0.0.0", "max_qp_wr": 1048576, "max_sge": 32, "max_qp_rd_atom": 128,
     "max_mr_size": 2**64 - 1,
     "ports": [{"port": 1, "state": "active", "link_layer": "Ethernet", "active_mtu": 1024, "lid": 0, "width_code": 1,
                "speed_code": 8, "gids": [_gid(0, "fe80::24:13ff:fec5:518f", True), _gid(1, "::ffff:10.99.0.1", True)]}]},
    {"name": "mlx5_0", "fw": "28.39.1002", "max_qp_wr": 32768, "max_sge": 30, "max_qp_rd_atom": 16,
     "max_mr_size": 2**64 - 1,
     "ports": [{"port": 1, "state": "active defer", "link_layer": "InfiniBand", "active_mtu": 4096, "lid": 7,
                "width_code": 2, "speed_code": 128, "gids": [_gid(0, "fe80::b83f:d203:a1:b2c3", False)]}]},
    {"name": "mlx5_1", "error": "cannot open: Permission denied", "ports": []},
]


def test_rdma_via_extension():
    got = rdma_via_extension(RXE_DEVICES)
    rxe, mlx, broken = got["devices"]
    assert rxe["name"] == "rxe0" and rxe["fw"] == "0.0.0" and rxe["max_qp_wr"] == 1048576
    assert rxe["max_qp_rd_atom"] == 128
    (port,) = rxe["ports"]
    assert (port["port"], port["state"], port["link_layer"], port["active_mtu"]) == (1, "ACTIVE", "Ethernet", 1024)
    assert port["rate_gbps"] == 10.0 and port["width"] == "1X" and port["speed"] == "FDR10"
    assert [(g["index"], g["gid"], g["type"]) for g in port["gids"]] == [
        (0, "fe80::24:13ff:fec5:518f", "RoCE v2"), (1, "::ffff:10.99.0.1", "RoCE v2")]
    (port,) = mlx["ports"]
    assert (port["state"], port["link_layer"], port["lid"], port["rate_gbps"]) == ("ACTIVE_DEFER", "InfiniBand", 7, 400)
    assert [(g["gid"], g["type"]) for g in port["gids"]] == [("fe80::b83f:d203:a1:b2c3", "IB")]
    assert broken == {"name": "mlx5_1", "error": "cannot open: Permission denied", "ports": []}


def test_rates_and_gids():
    assert decode_rate(2, 32)["rate_gbps"] == 100.0   # 4X EDR
    assert decode_rate(2, 128)["rate_gbps"] == 400.0  # 4X NDR
    assert decode_rate(1, 64)["rate_gbps"] == 50.0    # 1X HDR
    assert rate_text(decode_rate(2, 64)) == "200 Gb/s (4X HDR, 50 Gb/s a lane)"
    unknown = decode_rate(3, 7)
    assert unknown["rate_gbps"] is None
    assert rate_text(unknown) == "unknown (width code 3 (unknown), speed code 7 (unknown))"
    assert gid_text(bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 2])) == "::ffff:192.168.1.2"
    assert gid_text(bytes.fromhex("fe800000000000000000000000000001")) == "fe80::1"


# --- the CUDA path, with a stand-in torch (no GPU on the CI host) ------------------------------

class _FakeTensor:
    def __init__(self, n: int) -> None:
        self.n = n

    def data_ptr(self) -> int:
        return 0x7F0000000000

    def numel(self) -> int:
        return self.n


def _fake_torch():
    import contextlib
    import types
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30)
    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                 get_device_properties=lambda i: props, device=lambda i: contextlib.nullcontext())
    return types.SimpleNamespace(__version__="9.9.9+cu999", version=types.SimpleNamespace(cuda="99.9"), cuda=cuda,
                                 uint8="uint8", empty=lambda n, dtype, device: _FakeTensor(n))


def test_cuda_with_devices(monkeypatch):
    """With a driver and torch: each device's name, and the dma-buf probe's result or error."""
    from kvtransfer import doctor
    from kvtransfer.errors import KVTransferError
    calls = []

    def dmabuf(ptr, nbytes):
        calls.append((ptr, nbytes))
        if len(calls) == 2:
            raise KVTransferError("cuMemGetHandleForAddressRange: CUDA_ERROR_NOT_SUPPORTED", op="cuda")
        return 0

    monkeypatch.setattr(_C, "cuda_available", lambda: (True, ""))
    monkeypatch.setattr(_C, "cuda_dmabuf", dmabuf)
    monkeypatch.setitem(sys.modules, "torch", _fake_torch())
    c = doctor.collect_cuda()
    assert c["available"] and c["via"] == "torch 9.9.9+cu999" and len(c["devices"]) == 2
    assert calls == [(0x7F0000000000, doctor.DMABUF_PROBE_BYTES)] * 2
    assert c["devices"][0]["dmabuf"] == {"ok": True, "offset": 0, "error": None}
    assert "CUDA_ERROR_NOT_SUPPORTED" in c["devices"][1]["dmabuf"]["error"]
    facts = {"build": doctor.collect_build(None), "rdma": {"source": "x", "devices": [], "reason": "none here"},
             "cuda": c, "engine": {"id": "ab" * 16, "pid": 1, "table": ["verbs", "shm", "tcp"], "transports": [{"name": "tcp", "listen": "h:1"}],
                                   "unavailable": {"verbs": "no", "shm": "no"}, "verbs_unavailable": "no",
                                   "shm_unavailable": "no", "env": {}}}
    s = sections(doctor.render_text(facts))["CUDA"]
    assert one(s, "driver") == "libcuda.so.1 loaded"
    assert one(s, "devices") == "2 (via torch 9.9.9+cu999)"
    assert values(s, "cuda:0") == ["NVIDIA H100 80GB HBM3 (sm 9.0, 80.0 GiB)"]
    assert values(s, "dma-buf export") == [
        "ok (offset 0)", "failed: cuMemGetHandleForAddressRange: CUDA_ERROR_NOT_SUPPORTED"]


def test_cuda_driver_without_torch_or_cupy(monkeypatch):
    from kvtransfer import doctor
    monkeypatch.setattr(_C, "cuda_available", lambda: (True, ""))
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    monkeypatch.setitem(sys.modules, "cupy", None)
    c = doctor.collect_cuda()
    assert c["available"] and c["devices"] == [] and c["via"] is None
    note = c["devices_note"]
    assert "need torch or cupy" in note and "torch: ModuleNotFoundError" in note and "cupy: ModuleNotFoundError" in note
