"""Server-record signatures without a swarm: who may sign what, and what a valid record must hold."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer

from swarm.errors import ConfigError
from swarm.protocol import ServerInfo
from swarm.signed_records import PeerIdentity, ServerRecordValidator, peer_identity

INFO = ServerInfo("online", 0, 2, 10.0, 1024, "float32", "1.0").to_wire()


@pytest.fixture(scope="module")
def identities() -> Iterator[tuple[PeerIdentity, PeerIdentity]]:
    first, second = peer_identity(None), peer_identity(None)
    try:
        yield first, second
    finally:
        first.discard()
        second.discard()


def _record(subkey: object, value: object) -> DHTRecord:
    return DHTRecord(b"key", MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), 1e9)


def _signed(identity: PeerIdentity, record: DHTRecord) -> DHTRecord:
    return dataclasses.replace(record, value=ServerRecordValidator(identity.private_key_der).sign_value(record))


def test_the_identity_file_gives_the_peer_id_p2pd_uses(identities) -> None:  # type: ignore[no-untyped-def]
    identity, _ = identities
    assert identity.peer_id == PeerID.from_identity(identity.path.read_bytes()).to_base58()
    assert identity.temporary and identity.path.exists()


def test_a_peer_signs_its_own_records_and_readers_strip_the_signature(identities) -> None:  # type: ignore[no-untyped-def]
    identity, _ = identities
    record = _record(identity.peer_id, INFO)
    signed = _signed(identity, record)
    reader = ServerRecordValidator()
    assert signed.value != record.value and reader.validate(signed)
    assert reader.strip_value(signed) == record.value


def test_unsigned_forged_tampered_and_malformed_records_are_refused(identities) -> None:  # type: ignore[no-untyped-def]
    victim, forger = identities
    reader = ServerRecordValidator()
    assert not reader.validate(_record(victim.peer_id, INFO)), "unsigned"
    forged = _signed(forger, _record(victim.peer_id, INFO))
    assert forged.value == _record(victim.peer_id, INFO).value, "a peer signs only records that name it"
    cheat = ServerRecordValidator(forger.private_key_der)
    cheat._peer_id = victim.peer_id  # a modified peer that signs for the victim's id with its own key
    forged = dataclasses.replace(forged, value=cheat.sign_value(forged))
    assert not reader.validate(forged), "signed by a key that is not the victim's"
    signed = _signed(victim, _record(victim.peer_id, INFO))
    tampered = dataclasses.replace(signed, value=signed.value.replace(b"online", b"onlinf", 1))
    assert not reader.validate(tampered), "changed after signing"
    assert not reader.validate(dataclasses.replace(signed, expiration_time=2e9)), "expiration changed"
    assert not reader.validate(_signed(victim, _record(victim.peer_id, {**INFO, "start": 3}))), "start > end"
    assert not reader.validate(_signed(victim, _record(victim.peer_id, "not a map"))), "not a server record"


@pytest.mark.parametrize("subkey", ["llama", "demo-model", b"\x12\x20" + bytes(32), 7])
def test_records_under_other_subkeys_pass_untouched(identities, subkey) -> None:  # type: ignore[no-untyped-def]
    identity, _ = identities
    record = _record(subkey, {"anything": 1})
    assert ServerRecordValidator(identity.private_key_der).sign_value(record) == record.value
    assert ServerRecordValidator().validate(record)


def test_an_identity_that_is_not_rsa_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ed25519.key"
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=bytes(64)).SerializeToString())
    with pytest.raises(ConfigError, match="not an RSA key"):
        peer_identity(path)
