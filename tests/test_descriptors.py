"""Descriptors, what crosses the wire: exact round trips, and malformed bytes refused
with InvalidArgumentError (never another exception, never a half-valid object)."""

from __future__ import annotations

import os

import msgspec
import numpy as np
import pytest

from kvtransfer import EngineDescriptor, InvalidArgumentError, RegionDescriptor, TransportUnavailableError
from support import WAIT_S, alloc_dst, assert_bytes


def test_round_trip_of_a_targets_descriptors(shared_target):
    for d in (shared_target.engine, shared_target.region):
        raw = d.to_bytes()
        assert isinstance(raw, bytes)
        back = type(d).from_bytes(raw)
        assert back == d and back.to_bytes() == raw
        assert type(d).from_bytes(bytearray(raw)) == d
        assert type(d).from_bytes(memoryview(raw)) == d
        assert hash(back) == hash(d)  # frozen: usable as dict keys
        with pytest.raises(AttributeError):
            back.version = 2  # type: ignore[misc]


def test_round_trip_of_local_descriptors(engine):
    arr = np.zeros(1000, np.uint8)
    region, desc = engine.register(arr)
    assert RegionDescriptor.from_bytes(desc.to_bytes()) == desc
    assert EngineDescriptor.from_bytes(engine.descriptor.to_bytes()) == engine.descriptor
    region.close()


@pytest.mark.timeout(30)
def test_descriptors_decoded_from_bytes_read_the_right_bytes(engine, shared_target, transport):
    """A reader that only has the bytes (as a real peer would) connects and reads."""
    edesc = EngineDescriptor.from_bytes(shared_target.engine.to_bytes())
    rdesc = RegionDescriptor.from_bytes(shared_target.region.to_bytes())
    peer = engine.connect(edesc, transport=transport)
    dst, region = alloc_dst(engine, 10_001)
    peer.read([(region, 0, rdesc, 999, 10_001)]).wait(timeout=WAIT_S)
    assert_bytes(dst, shared_target.expected[999:11_000])


def _malformed(good: msgspec.Struct, other: msgspec.Struct) -> dict[str, bytes]:
    raw = good.to_bytes()
    as_dict = msgspec.to_builtins(good)
    missing = dict(as_dict)
    missing.pop("engine_id")
    wrong_type = dict(as_dict)
    wrong_type["version"] = "one"
    return {
        "empty": b"",
        "one_bad_byte": b"\xc1",
        "random": os.urandom(64),
        "truncated": raw[:-3],
        "trailing_garbage": raw + b"\x00",
        "other_descriptor_type": other.to_bytes(),
        "json_not_msgpack": msgspec.json.encode(good),
        "msgpack_int": msgspec.msgpack.encode(7),
        "msgpack_list": msgspec.msgpack.encode([1, 2, 3]),
        "missing_field": msgspec.msgpack.encode(missing),
        "wrong_field_type": msgspec.msgpack.encode(wrong_type),
        "schema_version_2": msgspec.structs.replace(good, version=2).to_bytes(),
        "schema_version_0": msgspec.structs.replace(good, version=0).to_bytes(),
        "engine_id_15_bytes": msgspec.structs.replace(good, engine_id=bytes(15)).to_bytes(),
        "engine_id_17_bytes": msgspec.structs.replace(good, engine_id=bytes(17)).to_bytes(),
    }


MALFORMED_KINDS = ["empty", "one_bad_byte", "random", "truncated", "trailing_garbage", "other_descriptor_type",
                   "json_not_msgpack", "msgpack_int", "msgpack_list", "missing_field", "wrong_field_type",
                   "schema_version_2", "schema_version_0", "engine_id_15_bytes", "engine_id_17_bytes"]


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
@pytest.mark.parametrize("which", ["engine", "region"])
def test_malformed_descriptor_bytes_are_invalid(shared_target, which, kind):
    good, other = ((shared_target.engine, shared_target.region) if which == "engine"
                   else (shared_target.region, shared_target.engine))
    data = _malformed(good, other)[kind]
    with pytest.raises(InvalidArgumentError) as ei:
        type(good).from_bytes(data)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("kind", ["random", "truncated", "other_descriptor_type", "schema_version_2"])
def test_connect_with_malformed_engine_bytes_is_invalid(engine, shared_target, kind):
    with pytest.raises(InvalidArgumentError):
        engine.connect(_malformed(shared_target.engine, shared_target.region)[kind])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("field,value", [("region_id", -1), ("key", -1)])
def test_region_descriptor_with_out_of_range_integers_is_refused_cleanly(engine, shared_target, field, value):
    """Descriptor bytes whose id or key does not fit the wire's unsigned 64-bit fields
    are malformed: refused with InvalidArgumentError by from_bytes, or at the latest by
    read(), never a bare OverflowError from the packing code. (This happens before any
    transport is involved; one automatically chosen peer is enough.)"""
    data = msgspec.structs.replace(shared_target.region, **{field: value}).to_bytes()
    peer = engine.connect(shared_target.engine)
    dst, region = alloc_dst(engine, 64)
    with pytest.raises(InvalidArgumentError):
        desc = RegionDescriptor.from_bytes(data)
        peer.read([(region, 0, desc, 0, 64)]).wait(timeout=WAIT_S)
    assert not dst.any()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("field,value", [("pid", 1 << 40), ("tcp_port", 1 << 40), ("tcp_port", -1), ("pid", -5)])
def test_engine_descriptor_with_out_of_range_integers_is_refused_cleanly(engine, shared_target, field, value):
    """An engine descriptor with impossible numbers: from_bytes refuses it
    (InvalidArgumentError), or connect reports the transport unavailable - never a
    bare OverflowError. If the automatic choice finds a transport the bad field does not
    matter to, the peer must read correctly."""
    data = msgspec.structs.replace(shared_target.engine, **{field: value}).to_bytes()
    try:
        desc = EngineDescriptor.from_bytes(data)
    except InvalidArgumentError:
        return
    try:
        peer = engine.connect(desc)
    except (InvalidArgumentError, TransportUnavailableError):
        return
    dst, region = alloc_dst(engine, 100)
    peer.read([(region, 0, shared_target.region, 0, 100)]).wait(timeout=WAIT_S)
    assert_bytes(dst, shared_target.expected[:100])
