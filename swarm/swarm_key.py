"""Private swarms: members share a secret key file, and outsiders can neither join the DHT nor call the peers.

The bundled p2pd has no libp2p private-network (PSK) option, so the key guards the two protocols above it:

  * DHT: every DHT request and response carries an HMAC-SHA256 of the message under the key, a timestamp and a
    nonce (`SwarmKeyAuthorizer`, plugged into hivemind's `authorizer` hook). A node without the key gets no answer
    to its bootstrap ping, so it cannot join; replays are refused by the nonce and a one-minute clock window.
  * Peer RPCs: every call (the first message of a stream) carries `{"auth": token}` in its metadata, the HMAC of
    the caller's and the callee's peer ids (`rpc_token`). libp2p authenticates both ids and encrypts the channel,
    so the token cannot be observed, and it is worthless to any other pair of peers. `KeyedP2P` adds it to a
    client's calls; peers check it before reading anything else (peer/handler.py).

The key file holds 32 random bytes, hex-encoded (`swarm new-key FILE` writes one). Anyone who has the file is a
member; keep it as private as an SSH key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.crypto import RSAPublicKey
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from swarm import messages
from swarm.errors import ConfigError

KEY_BYTES = 32
MAX_CLOCK_SKEW_SECONDS = 60.0  # a DHT request older or newer than this is refused (replay window)

_M = TypeVar("_M")


@dataclass(frozen=True, slots=True)
class SwarmKey:
    secret: bytes

    def __repr__(self) -> str:  # never print the secret
        return "SwarmKey(...)"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SwarmKey:
        try:
            text = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the swarm key {path}: {e}") from e
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) < KEY_BYTES:
            raise ConfigError(f"{path} is not a swarm key: expected {KEY_BYTES} hex-encoded bytes (`swarm new-key`)")
        return cls(secret)

    @staticmethod
    def write_new(path: str | os.PathLike[str]) -> None:
        """Write a fresh key readable by its owner only; refuse to overwrite one."""
        path = Path(path)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{path} exists; a swarm key is never overwritten") from None
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")

    def mac(self, *parts: bytes) -> bytes:
        digest = hmac.new(self.secret, digestmod=hashlib.sha256)
        for part in parts:
            digest.update(len(part).to_bytes(8, "big") + part)
        return digest.digest()


def rpc_token(key: SwarmKey, caller: str, callee: str) -> bytes:
    """What `caller` shows `callee` (base58 peer ids) to call its RPCs."""
    return key.mac(b"blockswarm-rpc", caller.encode(), callee.encode())


def check_rpc_token(key: SwarmKey, metadata: dict[str, Any], caller: str, callee: str) -> bool:
    token = metadata.get("auth")
    return isinstance(token, bytes) and hmac.compare_digest(token, rpc_token(key, caller, callee))


class SwarmKeyAuthorizer(AuthorizerBase):
    """hivemind's DHT authorizer for a shared key: HMACs instead of an authority's tokens."""

    def __init__(self, key: SwarmKey):
        self.key = key
        self._recent_nonces: TimedStorage[bytes, None] = TimedStorage()

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key: RSAPublicKey | None) -> None:
        request.auth.time = get_dht_time()
        request.auth.nonce = secrets.token_bytes(16)
        request.auth.signature = b""
        request.auth.signature = self.key.mac(b"dht-request", request.SerializeToString())

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        signature, request.auth.signature = request.auth.signature, b""
        if not hmac.compare_digest(signature, self.key.mac(b"dht-request", request.SerializeToString())):
            return False
        now = get_dht_time()
        if abs(request.auth.time - now) > MAX_CLOCK_SKEW_SECONDS or request.auth.nonce in self._recent_nonces:
            return False
        self._recent_nonces.store(request.auth.nonce, None, now + 3 * MAX_CLOCK_SKEW_SECONDS)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        response.auth.nonce = request.auth.nonce
        response.auth.signature = b""
        response.auth.signature = self.key.mac(b"dht-response", response.SerializeToString())

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        signature, response.auth.signature = response.auth.signature, b""
        expected = self.key.mac(b"dht-response", response.SerializeToString())
        return hmac.compare_digest(signature, expected) and response.auth.nonce == request.auth.nonce


class KeyedP2P(P2P):
    """A hivemind P2P replica whose calls to peers carry this member's RPC token. Only the calling methods are
    served (by the wrapped replica): it is for clients, which call and serve nothing."""

    def __init__(self, p2p: P2P, key: SwarmKey):  # no super().__init__(): the wrapped replica does the work
        self.p2p = p2p
        self.key = key
        self.peer_id = p2p.peer_id

    def __del__(self) -> None:  # P2P.__del__ would stop a daemon; the wrapped replica owns the connection to it
        pass

    async def shutdown(self) -> None:
        await self.p2p.shutdown()

    async def call_protobuf_handler(  # type: ignore[override]
        self, peer_id: PeerID, name: str, request: runtime_pb2.ExpertRequest, output_type: type[_M]
    ) -> _M:
        return await self.p2p.call_protobuf_handler(peer_id, name, self.signed(request, peer_id), output_type)

    async def iterate_protobuf_handler(  # type: ignore[override]
        self,
        peer_id: PeerID,
        name: str,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        output_type: type[_M],
    ) -> AsyncIterator[_M]:
        async def signed_first() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            first = True
            async for request in requests:
                yield self.signed(request, peer_id) if first else request
                first = False

        return await self.p2p.iterate_protobuf_handler(peer_id, name, signed_first(), output_type)

    async def call_binary_stream_handler(
        self, peer_id: PeerID, handler_name: str
    ) -> tuple[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw stream, for `swarm.message_stream.MessageStream`, which signs its first message (`signed`)."""
        return await self.p2p.call_binary_stream_handler(peer_id, handler_name)

    def signed(self, request: runtime_pb2.ExpertRequest, callee: PeerID) -> runtime_pb2.ExpertRequest:
        metadata = messages.unpack_metadata(request.metadata) if request.metadata else {}
        metadata["auth"] = rpc_token(self.key, self.peer_id.to_base58(), callee.to_base58())
        signed = runtime_pb2.ExpertRequest()
        signed.CopyFrom(request)
        signed.metadata = messages.pack_metadata(metadata)
        return signed
