"""Signed server records: only a peer can write the records that carry its peer id, and only well-formed ones.

A peer announces each hosted block under `{prefix}.{block}` with its own base58 peer id as the subkey
(swarm/protocol.py). Without signatures any DHT member could claim blocks for another peer, mark it offline or
inflate its throughput. `ServerRecordValidator` makes every record whose subkey is a peer id a *server record*:

  * its value ends with `[blockswarm-signature:PUBLIC_KEY:SIGNATURE]`, an RSA PKCS#1 v1.5 SHA-256 signature of
    the whole record (key, subkey, value without the signature, expiration time);
  * PUBLIC_KEY is the peer's libp2p identity key, and the peer id in the subkey must be derived from it (an RSA
    key's peer id is the SHA-256 multihash of the key), so no other key can sign for that id;
  * the value must decode to a valid `ServerInfo`.

hivemind runs the validator on every DHT node that stores a record and on every node that receives one in a
lookup, so forged and malformed records are refused when written and dropped when read: they never reach
routing. Records under other subkeys (model records, training progress, averaging groups) pass untouched.

Peers sign with the RSA identity their p2pd uses (`peer_identity`): a fresh one per start, or the file given
with `--identity-path`, which keeps the peer id across restarts.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import base58
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer

from swarm.errors import ConfigError, ProtocolError
from swarm.protocol import ServerInfo

logger = logging.getLogger(__name__)

_SIGNATURE_RE = re.compile(rb"\[blockswarm-signature:([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)\]\Z")
_SHA256_MULTIHASH = b"\x12\x20"  # sha2-256, 32 bytes: the peer id of an RSA key
_IDENTITY_MULTIHASH = b"\x00"  # the peer id that inlines a small (e.g. Ed25519) key


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """A peer's libp2p identity: the key file p2pd reads and the RSA private key (DER) that signs its records."""

    path: Path
    private_key_der: bytes
    peer_id: str  # base58
    temporary: bool  # written for this start only: the caller removes it once p2pd has read it (`discard`)
    existed: bool  # the file was there before: hivemind checks that no running peer uses it already

    def discard(self) -> None:
        if self.temporary:
            shutil.rmtree(self.path.parent, ignore_errors=True)


def peer_identity(identity_path: str | os.PathLike[str] | None) -> PeerIdentity:
    """The identity at `identity_path` (written first if the file does not exist), or a fresh one in a private
    temporary file. Only RSA identities can sign server records; hivemind writes RSA keys."""
    if identity_path is None:
        path = Path(tempfile.mkdtemp(prefix="blockswarm-identity-")) / "identity.key"
    else:
        path = Path(identity_path)
    existed = path.exists()
    if not existed:
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    try:
        key = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the identity {path}: {e}") from e
    if key.key_type != crypto_pb2.KeyType.RSA:
        raise ConfigError(f"the identity {path} is not an RSA key; peers sign their records with RSA identities")
    private_key = serialization.load_der_private_key(key.data, password=None)
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ConfigError(f"the identity {path} does not hold an RSA private key")
    peer_id = peer_id_of(_public_key_bytes(private_key.public_key()))
    return PeerIdentity(path, key.data, peer_id, temporary=identity_path is None, existed=existed)


def peer_id_of(public_key: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key in libp2p's protobuf encoding."""
    return base58.b58encode(multihash.encode(hashlib.sha256(public_key).digest(), "sha2-256")).decode()


class ServerRecordValidator(RecordValidatorBase):
    """Signs this peer's server records (with `private_key_der`) and validates everyone's (see the module doc).

    Nodes that write no server records (clients, monitors, bootstrap nodes) create it without a key."""

    def __init__(self, private_key_der: bytes | None = None):
        self._private_key_der = private_key_der  # bytes travel to the DHT process (validators are pickled) ...
        self._private_key: rsa.RSAPrivateKey | None = None  # ... the key object is loaded there, once (~25 ms)
        self._peer_id: str | None = None
        self._public_key: bytes | None = None
        if private_key_der is not None:
            self._public_key = _public_key_bytes(_load_private_key(private_key_der).public_key())
            self._peer_id = peer_id_of(self._public_key)

    @property
    def priority(self) -> int:
        return 10  # before validators that decode values: they must see the value without the signature

    def validate(self, record: DHTRecord) -> bool:
        peer_id = _server_record_peer_id(record.subkey)
        if peer_id is None:
            return True  # not a server record
        match = _SIGNATURE_RE.search(record.value)
        if match is None:
            logger.debug("Dropped an unsigned server record for peer %s", peer_id)
            return False
        public_key, signature = base64.b64decode(match[1]), base64.b64decode(match[2])
        if peer_id_of(public_key) != peer_id:
            logger.debug("Dropped a server record for peer %s signed by another key", peer_id)
            return False
        stripped = dataclasses.replace(record, value=record.value[: match.start()])
        try:
            key = serialization.load_der_public_key(crypto_pb2.PublicKey.FromString(public_key).data)
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            key.verify(signature, _signed_bytes(stripped), padding.PKCS1v15(), hashes.SHA256())
            ServerInfo.from_wire(MSGPackSerializer.loads(stripped.value))
        except (InvalidSignature, ValueError, ProtocolError) as e:
            logger.debug("Dropped a server record for peer %s: %s", peer_id, e)
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._private_key_der is None or _server_record_peer_id(record.subkey) != self._peer_id:
            return record.value  # someone else's record fails validation anyway; leave it as it is
        assert self._public_key is not None
        if self._private_key is None:
            self._private_key = _load_private_key(self._private_key_der)
        signature = self._private_key.sign(_signed_bytes(record), padding.PKCS1v15(), hashes.SHA256())
        encoded = b":".join(base64.b64encode(part) for part in (self._public_key, signature))
        return record.value + b"[blockswarm-signature:" + encoded + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        if _server_record_peer_id(record.subkey) is None:
            return record.value
        match = _SIGNATURE_RE.search(record.value)
        return record.value if match is None else record.value[: match.start()]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_private_key": None}

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False  # keep each instance: only one of them may hold the signing key


def _server_record_peer_id(subkey: bytes) -> str | None:
    """The peer id a record's serialized subkey names, or None when the subkey is not a peer id."""
    try:
        value: Any = MSGPackSerializer.loads(subkey)
    except Exception:
        return None
    if not isinstance(value, str) or not value:
        return None
    try:
        raw = base58.b58decode(value)
    except ValueError:
        return None
    is_sha256 = raw.startswith(_SHA256_MULTIHASH) and len(raw) == 34
    is_inline = raw.startswith(_IDENTITY_MULTIHASH) and len(raw) >= 2 and raw[1] == len(raw) - 2
    return value if is_sha256 or is_inline else None


def _signed_bytes(record: DHTRecord) -> bytes:
    return MSGPackSerializer.dumps(dataclasses.astuple(record))


def _load_private_key(der: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_der_private_key(der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _public_key_bytes(public_key: rsa.RSAPublicKey) -> bytes:
    """libp2p's encoding of an RSA public key: a PublicKey protobuf around the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
