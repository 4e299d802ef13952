"""``kvtransfer doctor``: what this machine can do, and which transport a peer would get.

    kvtransfer doctor                         # or: python -m kvtransfer doctor
    kvtransfer doctor --peer-hex HEX          # + the transport Engine.connect would pick
    kvtransfer doctor --peer FILE --connect   # + actually connect, report what it got
    kvtransfer doctor --json                  # the same facts as one JSON object

Sections, printed like perftest's header (aligned ``key : value`` lines):

- **Build**: kvtransfer's version and location, the extension, whether verbs was
  compiled in (a build without libibverbs headers says so), libibverbs as loaded, pyverbs.
- **RDMA**: devices, ports, state, link layer, active MTU, rate (width x lane speed,
  decoded from the verbs codes), GIDs with their type. Read through pyverbs when
  ``import pyverbs`` works in this interpreter (Debian's ``/usr/bin/python3`` with
  python3-pyverbs has it, the project venv usually not), else through
  ``kvtransfer._C.verbs_devices()``; ``--rdma-via`` picks one. No device: says so and why.
- **CUDA**: the driver (``libcuda.so.1``, loaded at run time), the devices (through
  torch or cupy when importable: both optional), dma-buf export of a small device
  buffer (what ``ibv_reg_dmabuf_mr`` needs), and whether nvidia-peermem is loaded.
- **Engine**: the transports an :class:`~kvtransfer.engine.Engine` made here offers
  (``Engine.transports()``, the C core's facts): verbs (device, port, GID index), shm
  (same host), tcp (its address), or why not.
- **Peer** (``--peer FILE`` holding ``EngineDescriptor.to_bytes()``, or ``--peer-hex``):
  the ordered candidates from the engine's own choice (``Engine.plan``, which asks the C
  core's transport table: forced by ``KVTRANSFER_TRANSPORT`` / ``--transport``, else the
  table's order), the pick and why; with ``--connect`` the transport ``Engine.connect``
  really got (and those that failed first), or its error.
- **Exposure**: the kvtransfer processes of this host that listen on TCP beyond loopback,
  each with a warning unless its command line configures CurveZMQ keys (without them
  anyone who reaches those ports can read registered memory).

Exit status: 0 (whatever the machine lacks is reported, not an error), 2 for a wrong
argument (unknown option, unreadable or malformed peer descriptor).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import re
import sys
from typing import Any, Callable

from . import __version__, _C
from .control.security import exposed_listeners
from .descriptors import EngineDescriptor
from .engine import TRANSPORTS, Engine, forced_transport
from .errors import KVTransferError

# --- verbs codes (infiniband/verbs.h) --------------------------------------------------

#: ibv_port_attr.active_width -> lanes
WIDTHS = {1: 1, 2: 4, 4: 8, 8: 12, 16: 2}
#: ibv_port_attr.active_speed -> (name, Gb/s per lane, as ibv_devinfo rounds them)
SPEEDS = {1: ("SDR", 2.5), 2: ("DDR", 5.0), 4: ("QDR", 10.0), 8: ("FDR10", 10.0), 16: ("FDR", 14.0),
          32: ("EDR", 25.0), 64: ("HDR", 50.0), 128: ("NDR", 100.0), 256: ("XDR", 200.0)}
#: ibv_port_state
PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
#: ibv_port_attr.link_layer (0, unspecified, is InfiniBand for IB devices)
LINK_LAYERS = {0: "InfiniBand", 1: "InfiniBand", 2: "Ethernet"}
#: enum ibv_mtu -> bytes
MTUS = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}

SYSFS_IB = "/sys/class/infiniband"
MAX_GIDS = 16  # as the extension lists them

RULE = "-" * 87
KEY_WIDTH = 24


def decode_rate(width_code: int, speed_code: int) -> dict[str, Any]:
    """Width and speed codes of a port -> lanes, lane speed and Gb/s (None when unknown)."""
    lanes = WIDTHS.get(width_code)
    speed = SPEEDS.get(speed_code)
    out: dict[str, Any] = {"width_code": width_code, "speed_code": speed_code,
                           "width": f"{lanes}X" if lanes else None, "speed": speed[0] if speed else None,
                           "lane_gbps": speed[1] if speed else None, "rate_gbps": None}
    if lanes and speed:
        out["rate_gbps"] = lanes * speed[1]
    return out


def rate_text(port: dict[str, Any]) -> str:
    if port.get("rate_gbps") is not None:
        return f"{port['rate_gbps']:g} Gb/s ({port['width']} {port['speed']}, {port['lane_gbps']:g} Gb/s a lane)"
    parts = [f"width code {port['width_code']}" + (f" = {port['width']}" if port.get("width") else " (unknown)"),
             f"speed code {port['speed_code']}" + (f" = {port['speed']}" if port.get("speed") else " (unknown)")]
    return "unknown (" + ", ".join(parts) + ")"


def gid_text(raw: bytes) -> str:
    """A GID as an IPv6 address; IPv4-mapped ones (RoCE v2 over IPv4) as ::ffff:a.b.c.d."""
    addr = ipaddress.IPv6Address(bytes(raw))
    return f"::ffff:{addr.ipv4_mapped}" if addr.ipv4_mapped else addr.compressed


def gid_from_words(text: str) -> bytes:
    """'0000:0000:...:0a63:0001' (8 groups of 4 hex digits) -> 16 bytes."""
    words = text.strip().split(":")
    if len(words) != 8 or not all(re.fullmatch(r"[0-9a-fA-F]{4}", w) for w in words):
        raise ValueError(f"not a GID: {text!r}")
    return bytes.fromhex("".join(words))


def _read_sysfs(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def sysfs_gid_type(dev: str, port: int, index: int, link_layer: str) -> str:
    """'RoCE v2', 'RoCE v1' or 'IB' for one GID (sysfs says 'IB/RoCE v1' for both of the latter)."""
    t = _read_sysfs(f"{SYSFS_IB}/{dev}/ports/{port}/gid_attrs/types/{index}") or ""
    if t.startswith("RoCE v2"):
        return "RoCE v2"
    if link_layer == "Ethernet":
        return "RoCE v1"
    return "IB"


def sysfs_gid_ndev(dev: str, port: int, index: int) -> str | None:
    return _read_sysfs(f"{SYSFS_IB}/{dev}/ports/{port}/gid_attrs/ndevs/{index}") or None


def _gid_entry(dev: str, port: int, index: int, raw: bytes, gid_type: str) -> dict[str, Any]:
    return {"index": index, "gid": gid_text(raw), "raw": raw.hex(), "type": gid_type,
            "netdev": sysfs_gid_ndev(dev, port, index)}


# --- RDMA: through pyverbs ------------------------------------------------------------------

def _import_pyverbs() -> tuple[Any, str | None]:
    try:
        import pyverbs  # noqa: F401
        import pyverbs.device as pvd
        return pvd, None
    except Exception as e:  # ImportError, or a pyverbs built for another libibverbs
        return None, f"{type(e).__name__}: {e}"


def _as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def rdma_via_pyverbs(pvd: Any) -> dict[str, Any]:
    """Devices, ports and GIDs through pyverbs (raises when the device list cannot be had)."""
    devices = []
    for d in pvd.get_device_list():
        name = _as_text(d.name)
        dev: dict[str, Any] = {"name": name, "ports": []}
        devices.append(dev)
        try:
            ctx = pvd.Context(name=name)
        except Exception as e:
            dev["error"] = f"cannot open: {e}"
            continue
        try:
            a = ctx.query_device()
            dev.update(fw=a.fw_version, max_qp_wr=a.max_qp_wr, max_sge=a.max_sge, max_qp_rd_atom=a.max_qp_rd_atom,
                       max_mr_size=a.max_mr_size)
            for p in range(1, a.phys_port_cnt + 1):
                try:
                    pa = ctx.query_port(p)
                except Exception as e:
                    dev["ports"].append({"port": p, "error": f"ibv_query_port: {e}"})
                    continue
                ll = LINK_LAYERS.get(pa.link_layer, f"unknown ({pa.link_layer})")
                port: dict[str, Any] = {"port": p, "state": PORT_STATES.get(pa.state, str(pa.state)),
                                        "link_layer": ll, "active_mtu": MTUS.get(pa.active_mtu, 0), "lid": pa.lid,
                                        **decode_rate(pa.active_width, pa.active_speed), "gids": []}
                for i in range(min(pa.gid_tbl_len, MAX_GIDS)):
                    try:
                        g = ctx.query_gid(p, i)
                        raw = gid_from_words(_as_text(getattr(g, "gid", g)))
                    except Exception:
                        continue
                    if any(raw):
                        port["gids"].append(_gid_entry(name, p, i, raw, sysfs_gid_type(name, p, i, ll)))
                dev["ports"].append(port)
        except Exception as e:
            dev["error"] = f"ibv_query_device: {e}"
        finally:
            try:
                ctx.close()
            except Exception:
                pass
    return {"devices": devices}


# --- RDMA: through the extension ----------------------------------------------------------

def port_state_name(text: str) -> str:
    """ibv_port_state_str()'s words ('active', 'no state change (NOP)', 'PORT_ACTIVE' in
    older rdma-core) -> the enum's name, as pyverbs' numbers are shown: 'ACTIVE'."""
    t = text.strip().removeprefix("PORT_").upper()
    return "NOP" if "NOP" in t else t.replace(" ", "_")


def rdma_via_extension(raw: list[dict[str, Any]]) -> dict[str, Any]:
    """``_C.verbs_devices()`` (libibverbs' facts as the C core reads them) -> the
    structure ``rdma_via_pyverbs`` returns: states named, rates and GIDs decoded."""
    devices = []
    for d in raw:
        dev = {k: v for k, v in d.items() if k != "ports"}
        dev["ports"] = []
        for p in d["ports"]:
            ll = p["link_layer"]
            gids = [_gid_entry(d["name"], p["port"], g["index"], g["raw"],
                               "RoCE v2" if g["rocev2"] else ("RoCE v1" if ll == "Ethernet" else "IB"))
                    for g in p["gids"]]
            dev["ports"].append({"port": p["port"], "state": port_state_name(p["state"]), "link_layer": ll,
                                 "active_mtu": p["active_mtu"], "lid": p["lid"],
                                 **decode_rate(p["width_code"], p["speed_code"]), "gids": gids})
        devices.append(dev)
    return {"devices": devices}


def _no_device_hint() -> str:
    if not os.path.isdir(SYSFS_IB):
        return f"no {SYSFS_IB} (no RDMA driver loaded)"
    if not os.listdir(SYSFS_IB):
        return f"{SYSFS_IB} is empty (no RDMA device)"
    if not os.path.isdir("/dev/infiniband"):
        return "no /dev/infiniband (ib_uverbs not loaded, or not visible in this container)"
    return "no RDMA device visible to libibverbs"


def collect_rdma(via: str) -> dict[str, Any]:
    """The RDMA section: ``via`` is auto (pyverbs if importable, else the extension),
    pyverbs or extension. With no device, ``reason`` says why (the extension's error
    is the most precise: it tells a kernel without RDMA from a build without verbs)."""
    out: dict[str, Any] = {"source": None, "devices": [], "reason": None}
    notes: list[str] = []
    pv_failed = None
    if via in ("auto", "pyverbs"):
        pvd, why = _import_pyverbs()
        if pvd is None:
            pv_failed = f"pyverbs not importable in this interpreter ({why})"
        else:
            try:
                out.update(rdma_via_pyverbs(pvd))
                out["source"] = "pyverbs"
            except Exception as e:
                pv_failed = f"pyverbs: {type(e).__name__}: {e}"
    if pv_failed:
        notes.append(pv_failed)
        if via == "pyverbs":
            out["source"] = "pyverbs (failed)"
    ext_error = None
    use_ext = via == "extension" or (via == "auto" and out["source"] is None)
    if use_ext or not out["devices"]:  # the extension's error says best why there is none
        try:
            raw: list[dict[str, Any]] | None = _C.verbs_devices()
        except KVTransferError as e:
            raw, ext_error = None, str(e)
        if use_ext:
            out["source"] = "kvtransfer._C.verbs_devices"
            if raw is not None:
                out.update(rdma_via_extension(raw))
    if not out["devices"]:
        out["reason"] = ext_error or (pv_failed if via == "pyverbs" else None) or _no_device_hint()
    if notes:
        out["notes"] = notes
    return out


# --- CUDA --------------------------------------------------------------------------------

def _try_torch() -> tuple[Any, str | None]:
    try:
        import torch
        return torch, None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _try_cupy() -> tuple[Any, str | None]:
    try:
        import cupy
        return cupy, None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _dmabuf_check(ptr: int, nbytes: int) -> dict[str, Any]:
    try:
        off = _C.cuda_dmabuf(ptr, nbytes)
        return {"ok": True, "offset": int(off), "error": None}
    except KVTransferError as e:
        return {"ok": False, "offset": None, "error": str(e)}


DMABUF_PROBE_BYTES = 2 << 20


def collect_cuda() -> dict[str, Any]:
    """The CUDA section. Device names and the dma-buf probe need torch or cupy (to
    allocate); neither is a dependency, so without them those facts say why they are missing."""
    ok, reason = _C.cuda_available()
    out: dict[str, Any] = {"available": bool(ok), "reason": reason or None, "via": None, "devices": [],
                           "nvidia_peermem": os.path.isdir("/sys/module/nvidia_peermem")}
    if not ok:
        return out
    torch, terr = _try_torch()
    if torch is not None and getattr(torch.version, "cuda", None) and torch.cuda.is_available():
        out["via"] = f"torch {torch.__version__}"
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            dev: dict[str, Any] = {"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                   "memory_bytes": int(props.total_memory)}
            try:
                with torch.cuda.device(i):
                    buf = torch.empty(DMABUF_PROBE_BYTES, dtype=torch.uint8, device=f"cuda:{i}")
                    dev["dmabuf"] = _dmabuf_check(buf.data_ptr(), buf.numel())
                    del buf
            except Exception as e:
                dev["dmabuf"] = {"ok": False, "offset": None, "error": f"allocating a probe buffer: {e}"}
            out["devices"].append(dev)
        return out
    cupy, cerr = _try_cupy()
    if cupy is not None:
        try:
            n = cupy.cuda.runtime.getDeviceCount()
            out["via"] = f"cupy {cupy.__version__}"
            for i in range(n):
                props = cupy.cuda.runtime.getDeviceProperties(i)
                name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
                dev = {"index": i, "name": name, "capability": f"{props['major']}.{props['minor']}",
                       "memory_bytes": int(props["totalGlobalMem"])}
                try:
                    with cupy.cuda.Device(i):
                        buf = cupy.empty(DMABUF_PROBE_BYTES, dtype=cupy.uint8)
                        dev["dmabuf"] = _dmabuf_check(int(buf.data.ptr), int(buf.nbytes))
                        del buf
                except Exception as e:
                    dev["dmabuf"] = {"ok": False, "offset": None, "error": f"allocating a probe buffer: {e}"}
                out["devices"].append(dev)
            return out
        except Exception as e:
            cerr = f"{type(e).__name__}: {e}"
    torch_why = terr or (f"torch {torch.__version__} has no CUDA" if torch is not None else "no torch")
    out["devices_note"] = (f"device names and the dma-buf probe need torch or cupy with CUDA: torch: {torch_why}; "
                           f"cupy: {cerr}")
    return out


# --- Build -------------------------------------------------------------------------------

def _loaded_library(fragment: str) -> str | None:
    """Path of a shared library mapped into this process (e.g. the libibverbs the
    extension is linked against), from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if fragment in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


WITHOUT_VERBS = "built without libibverbs headers"


def collect_build(verbs_why: str | None) -> dict[str, Any]:
    pvd, pv_err = _import_pyverbs()
    import kvtransfer
    compiled_in = not (verbs_why and WITHOUT_VERBS in verbs_why)
    return {
        "kvtransfer": __version__,
        "package": os.path.dirname(os.path.abspath(kvtransfer.__file__)),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "extension": _C.__file__,
        "verbs_compiled_in": compiled_in,
        "verbs_build_note": None if compiled_in else verbs_why,
        "libibverbs": _loaded_library("libibverbs.so"),
        "pyverbs": os.path.dirname(pvd.__file__) if pvd is not None else None,
        "pyverbs_error": pv_err,
    }


# --- Engine and peer -----------------------------------------------------------------------

ENV_KNOBS = ("KVTRANSFER_TRANSPORT", "KVTRANSFER_IB_DEVICE", "KVTRANSFER_IB_PORT", "KVTRANSFER_IB_GID_INDEX")


def collect_engine(eng: Engine) -> dict[str, Any]:
    """The transports this engine offers, as the C core's table reports them."""
    d = eng.descriptor
    offers = eng.transports()
    why_not = {o.name: o.why_not for o in offers if not o.offered}
    return {"id": eng.id, "hostname": d.hostname, "pid": d.pid,
            "table": [o.name for o in offers],
            "transports": [{"name": o.name, **o.facts} for o in offers if o.offered],
            "unavailable": why_not,
            "verbs_unavailable": why_not.get("verbs"), "shm_unavailable": why_not.get("shm"),
            "env": {k: os.environ[k] for k in ENV_KNOBS if k in os.environ},
            "tcp_server": {"limits": eng.tcp_limits, "stats": eng.server_stats()}}


def describe_peer(desc: EngineDescriptor) -> dict[str, Any]:
    return {"engine_id": desc.engine_id.hex(), "hostname": desc.hostname, "pid": desc.pid, "boot_id": desc.boot_id,
            "pidns": desc.pidns, "tcp": f"{desc.tcp_host}:{desc.tcp_port}", "verbs": desc.verbs,
            "ib_device": desc.ib_device or None, "gid": gid_text(desc.gid) if len(desc.gid) == 16 else None}


def collect_peer(eng: Engine, desc: EngineDescriptor, forced_arg: str | None, connect: bool) -> dict[str, Any]:
    """What :meth:`Engine.plan` says of the peer (candidates, pick and why), and with
    ``connect`` what :meth:`Engine.connect` got (``.tried``: what failed first)."""
    forced, by = forced_transport(forced_arg)
    reasons = {r.name: r.why for r in eng.plan(desc, transport="auto")}
    out: dict[str, Any] = {"descriptor": describe_peer(desc), "same_host": eng.descriptor.same_host_as(desc),
                           "forced": forced, "forced_by": ("--transport" if by == "argument" else by),
                           "candidates": None, "pick": None, "why": None, "error": None, "reasons": reasons}
    try:
        plan = eng.plan(desc, transport=forced_arg)
    except KVTransferError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    else:
        cands = [r for r in plan if r.ok]
        out["candidates"] = [r.name for r in cands]
        out["pick"] = cands[0].name
        if forced:
            out["why"] = f"forced by {out['forced_by']}={forced}"
        else:
            out["why"] = cands[0].why
            out["skipped"] = {r.name: r.why for r in plan if not r.ok}
    if connect:
        out["connect"] = try_connect(eng, desc, forced_arg)
    return out


def try_connect(eng: Engine, desc: EngineDescriptor, forced_arg: str | None) -> dict[str, Any]:
    """``Engine.connect`` for real: the transport it got, and those that failed first."""
    try:
        peer = eng.connect(desc, transport=forced_arg)
    except KVTransferError as e:
        return {"transport": None, "error": f"{type(e).__name__}: {e}", "log": []}
    with peer:
        log = [f"{t.name} failed: {t.why}" for t in peer.tried] + [f"connected via {peer.transport}"]
        return {"transport": peer.transport, "error": None, "log": log}


# --- text output ---------------------------------------------------------------------------

def _facts_text(x: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in x.items() if k != "name")


#: How the Engine section words each transport's facts (others: "key value, ...").
OFFER_TEXT: dict[str, Callable[[dict[str, Any]], str]] = {
    "verbs": lambda x: f"{x['device']} port {x['port']}, GID index {x['gid_index']} ({x['gid']})",
    "map": lambda x: f"same-host peers' shared memory ({x['mappable_regions']} such regions registered here)",
    "shm": lambda x: f"same-host peers (boot id {x['boot_id']}, pid namespace {x['pidns']})",
    "tcp": lambda x: f"listening on {x['listen']}",
}


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, title: str, note: str = "") -> None:
        self.lines += [RULE, f" {title}" + (f"  ({note})" if note else ""), RULE]

    def kv(self, key: str, value: Any, indent: int = 0) -> None:
        k = " " * indent + key
        self.lines.append(f" {k:<{KEY_WIDTH}}: {value}")

    def render(self) -> str:
        return "\n".join(self.lines + [RULE]) + "\n"


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _tcp_server_lines(t: _Text, lim: dict[str, int], st: dict[str, int]) -> None:
    t.kv("tcp limits", f"{lim['max_conns']} connections ({lim['max_conns_per_peer']} per address), "
                       f"idle {lim['idle_timeout_ms'] / 1000:g} s, {lim['max_frame_bytes'] >> 20} MiB per request")
    t.kv("tcp server", f"{st['connections']} connections, {st['threads']} threads; refused {st['refused_busy']} "
                       f"busy, {st['refused_token']} token, {st['refused_frames']} requests; dropped "
                       f"{st['dropped_idle']} idle, {st['dropped_deadline']} late, {st['dropped_revoked']} revoked")


def render_text(facts: dict[str, Any]) -> str:
    t = _Text()
    b = facts["build"]
    t.section("Build")
    t.kv("kvtransfer", f"{b['kvtransfer']} ({b['package']})")
    t.kv("python", b["python"])
    t.kv("platform", b["platform"])
    t.kv("extension", b["extension"])
    t.kv("verbs compiled in", "yes" if b["verbs_compiled_in"] else f"no: {b['verbs_build_note']}")
    t.kv("libibverbs", b["libibverbs"] or "not loaded")
    t.kv("pyverbs", b["pyverbs"] or f"not importable ({b['pyverbs_error']})")

    r = facts["rdma"]
    eng = facts["engine"]
    used = next((x for x in eng["transports"] if x["name"] == "verbs"), None)
    t.section("RDMA", f"via {r['source']}")
    if not r["devices"]:
        t.kv("devices", "none")
        t.kv("reason", r["reason"])
    else:
        t.kv("devices", f"{len(r['devices'])} ({', '.join(d['name'] for d in r['devices'])})")
    for d in r["devices"]:
        if "fw" in d:
            t.kv("device", f"{d['name']} (fw {d['fw'] or '-'}, max_qp_wr {d['max_qp_wr']}, max_sge {d['max_sge']}, "
                           f"max_qp_rd_atom {d['max_qp_rd_atom']})")
        else:
            t.kv("device", d["name"])
        if d.get("error"):
            t.kv("error", d["error"], 2)
        for p in d["ports"]:
            mine = used is not None and used["device"] == d["name"] and used["port"] == p["port"]
            if "error" in p:
                t.kv(f"port {p['port']}", p["error"], 2)
                continue
            t.kv(f"port {p['port']}", p["state"] + ("  <- the engine's port" if mine else ""), 2)
            t.kv("link layer", p["link_layer"], 4)
            t.kv("active MTU", p["active_mtu"], 4)
            t.kv("rate", rate_text(p), 4)
            if p["link_layer"] != "Ethernet":
                t.kv("lid", p["lid"], 4)
            if not p["gids"]:
                t.kv("GIDs", "none (no IP address on the netdev?)", 4)
            for g in p["gids"]:
                extra = f", {g['netdev']}" if g.get("netdev") else ""
                mark = "  <- the engine's GID" if mine and used["gid_index"] == g["index"] else ""
                t.kv(f"GID {g['index']}", f"{g['gid']} ({g['type']}{extra}){mark}", 4)
    for n in r.get("notes", []):
        t.kv("note", n)

    c = facts["cuda"]
    t.section("CUDA")
    t.kv("driver", "libcuda.so.1 loaded" if c["available"] else f"unavailable: {c['reason']}")
    if c["available"]:
        if c["via"]:
            t.kv("devices", f"{len(c['devices'])} (via {c['via']})")
        else:
            t.kv("devices", c.get("devices_note", "unknown"))
        for d in c["devices"]:
            t.kv(f"cuda:{d['index']}", f"{d['name']} (sm {d['capability']}, {d['memory_bytes'] / 2**30:.1f} GiB)")
            db = d.get("dmabuf") or {}
            t.kv("dma-buf export", f"ok (offset {db['offset']})" if db.get("ok") else f"failed: {db.get('error')}", 2)
    t.kv("nvidia-peermem", "loaded" if c["nvidia_peermem"] else "not loaded")

    t.section("Engine", f"id {eng['id'][:16]}, pid {eng['pid']}")
    offered = {x["name"]: x for x in eng["transports"]}
    for name in eng["table"]:
        if name in offered:
            t.kv(name, "yes: " + OFFER_TEXT.get(name, _facts_text)(offered[name]))
        else:
            t.kv(name, f"no: {eng['unavailable'][name]}")
    t.kv("offers", ", ".join(x["name"] for x in eng["transports"]))
    if "tcp_server" in eng:
        _tcp_server_lines(t, eng["tcp_server"]["limits"], eng["tcp_server"]["stats"])
    for k, v in eng["env"].items():
        t.kv(k, v)
    _exposure_lines(t, facts.get("exposure", []))

    p = facts.get("peer")
    if p is not None:
        d = p["descriptor"]
        t.section("Peer", f"engine {d['engine_id'][:16]}")
        t.kv("host", f"{d['hostname']}, pid {d['pid']}, boot id {d['boot_id']}")
        t.kv("tcp", d["tcp"])
        t.kv("rdma", f"{d['ib_device']} {d['gid']}" if d["verbs"] else "none")
        t.kv("same host", _yn(p["same_host"]))
        t.kv("forced", f"{p['forced']} (by {p['forced_by']})" if p["forced"] else "no")
        if p["error"]:
            t.kv("pick", "none")
            t.kv("error", p["error"])
        else:
            t.kv("candidates", ", ".join(p["candidates"]))
            t.kv("pick", p["pick"])
            t.kv("why", p["why"])
            for name, reason in p.get("skipped", {}).items():
                t.kv(f"not {name}", reason)
        if "connect" in p:
            cn = p["connect"]
            t.kv("connect", f"ok: peer.transport = {cn['transport']}" if cn["transport"] else f"failed: {cn['error']}")
            for m in cn["log"]:
                t.kv("log", m, 2)
    return t.render()


def _exposure_lines(t: _Text, rows: list[dict[str, Any]]) -> None:
    """Which kvtransfer processes listen beyond loopback, and whether CURVE guards them."""
    t.section("Exposure", "kvtransfer processes listening beyond loopback")
    t.kv("checked", "this host's processes that loaded kvtransfer (those this user may read)")
    if not rows:
        t.kv("listening", "none beyond loopback")
    for r in rows:
        t.kv(f"pid {r['pid']}", f"{r['address']}:{r['port']} ({r['command']}) " +
             ("with CurveZMQ keys" if r["curve"] else
              "WARNING: WITHOUT CurveZMQ keys: anyone who reaches it can read registered memory"))


# --- entry points ----------------------------------------------------------------------------

class _ArgError(Exception):
    pass


def _load_peer(args: argparse.Namespace) -> EngineDescriptor | None:
    if args.peer is None and args.peer_hex is None:
        return None
    if args.peer is not None:
        try:
            with open(args.peer, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _ArgError(f"--peer {args.peer}: {e.strerror or e}") from None
        # a file may also hold the hex text (what `kvtransfer.testing.target` prints)
        stripped = data.strip()
        if stripped and re.fullmatch(rb"[0-9a-fA-F]+", stripped) and len(stripped) % 2 == 0:
            data = bytes.fromhex(stripped.decode())
    else:
        try:
            data = bytes.fromhex(args.peer_hex.strip())
        except ValueError as e:
            raise _ArgError(f"--peer-hex: not hex: {e}") from None
    try:
        return EngineDescriptor.from_bytes(data)
    except KVTransferError as e:
        raise _ArgError(f"peer descriptor: {e}") from None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog or "kvtransfer doctor",
                                 description="What this machine can do for kvtransfer: RDMA devices, CUDA, the "
                                 "engine's transports, and the transport a peer would get.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--peer", metavar="FILE", help="a file holding a peer's EngineDescriptor.to_bytes() (or its hex)")
    src.add_argument("--peer-hex", metavar="HEX", help="a peer's EngineDescriptor.to_bytes(), as hex")
    ap.add_argument("--connect", action="store_true", help="with a peer: really connect, report the transport got")
    ap.add_argument("--transport", choices=TRANSPORTS,
                    help="force a transport for the peer checks (as KVTRANSFER_TRANSPORT does)")
    ap.add_argument("--listen-host", default="127.0.0.1", help="the engine's tcp listen address (default %(default)s)")
    ap.add_argument("--io-timeout", type=float, default=5.0, help="engine io timeout, seconds (default %(default)s)")
    ap.add_argument("--rdma-via", choices=("auto", "pyverbs", "extension"), default="auto",
                    help="read RDMA devices through pyverbs or the extension (auto: pyverbs when importable)")
    ap.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    return ap


def collect(args: argparse.Namespace, peer: EngineDescriptor | None) -> dict[str, Any]:
    with Engine(listen_host=args.listen_host, io_timeout=args.io_timeout, use_verbs=True) as eng:
        facts: dict[str, Any] = {"build": collect_build(eng.verbs_unavailable), "rdma": collect_rdma(args.rdma_via),
                                 "cuda": collect_cuda(), "engine": collect_engine(eng)}
        if peer is not None:
            facts["peer"] = collect_peer(eng, peer, args.transport, args.connect)
    facts["exposure"] = exposed_listeners()
    return facts


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = build_parser(prog)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse: 2 for a wrong argument, 0 for --help
        return int(e.code or 0)
    try:
        peer = _load_peer(args)
        if args.connect and peer is None:
            raise _ArgError("--connect needs --peer or --peer-hex")
        if args.io_timeout < 0.001:
            raise _ArgError(f"--io-timeout must be at least 0.001 s, got {args.io_timeout}")
    except _ArgError as e:
        ap.print_usage(sys.stderr)
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        facts = collect(args, peer)
    except KVTransferError as e:  # e.g. the listen address cannot be bound
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(facts, indent=None, default=str))
    else:
        sys.stdout.write(render_text(facts))
    sys.stdout.flush()
    return 0


COMMANDS: dict[str, tuple[str, Callable[..., int]]] = {
    "doctor": ("what this machine can do, and which transport a peer would get", main),
}


def cli(argv: list[str] | None = None) -> int:
    """``kvtransfer SUBCOMMAND ...`` (console script and ``python -m kvtransfer``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        out = sys.stdout if argv else sys.stderr
        print("usage: kvtransfer COMMAND [ARGS...]\n\ncommands:", file=out)
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:<10} {text}", file=out)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"kvtransfer {__version__}")
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"kvtransfer: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return cmd[1](argv[1:], prog=f"kvtransfer {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
