"""Control requests to another host's daemon, over the peers' channel: mutual TLS and
the shared key, as between daemons, with this host's own certificate.

``livemig --host beta vm list`` on alpha, ``vm list --all`` and a daemon learning which
addresses its peers' VMs use all come here. A request travels as one ``ControlCall``
frame on a fresh connection; each control reply comes back as a Reply frame, the last
one ends the call (``messages.Interim`` says which do not).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path

from livemig import config, keys
from livemig.errors import LivemigError
from livemig.wire import channel, frames, messages, tls
from livemig.wire.messages import ControlReply, ControlRequest

CONNECT_TIMEOUT_S = 5.0  # a host that does not answer is reported, not waited for
REPLY_TIMEOUT_S = 30.0  # between two replies; a migration sends progress far more often


class HostUnreachable(LivemigError):
    def __init__(self, host: str, why: str) -> None:
        super().__init__(f"host {host} does not answer ({why})")
        self.host = host


def read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LivemigError(f"cannot read the peer key {path} ({exc.strerror}); a host's "
                           f"CLI speaks to other hosts with its daemon's key") from exc


def client_context(here: config.HostConfig) -> tls.Contexts:
    return tls.Contexts(keys.HostFiles.in_dir(here.tls_dir, here.name))


async def call(here: config.HostConfig, key: bytes, contexts: tls.Contexts | None, host: str,
               request: ControlRequest) -> AsyncGenerator[ControlReply, None]:
    """Send ``request`` to ``host``'s daemon and yield its replies until the last.
    ``contexts`` None: plaintext (daemons started with --insecure-plaintext)."""
    try:
        address = await asyncio.to_thread(here.peer_address, host)
        peer = await channel.connect(
            address, here.port, key=key, me=here.name,
            ssl=contexts.client() if contexts is not None else None, peer_name=host,
            timeout=CONNECT_TIMEOUT_S)
    except (frames.WireError, OSError) as exc:
        raise HostUnreachable(host, str(exc)) from exc
    try:
        await peer.send(messages.request_frame(messages.ControlCall(request=request)))
        while True:
            message = await peer.recv(timeout=REPLY_TIMEOUT_S)
            if isinstance(message, frames.Abort):
                raise LivemigError(f"{host} refused: {message.reason}")
            if not isinstance(message, frames.Reply):
                raise frames.RemoteProtocolError(host, f"sent {type(message).__name__} "
                                                       f"to a control call", "Reply")
            reply = messages.read_control_reply(message, host)
            yield reply
            if not isinstance(reply, messages.Interim):
                return
            await peer.send(messages.request_frame(messages.ControlMore()))
    except frames.WireError as exc:
        raise HostUnreachable(host, str(exc)) from exc
    finally:
        with contextlib.suppress(frames.WireError, OSError):
            await peer.close()


async def list_vms(here: config.HostConfig, key: bytes, contexts: tls.Contexts | None,
                   host: str) -> list[messages.VMInfo]:
    async with contextlib.aclosing(call(here, key, contexts, host, messages.ListVMs())) as replies:
        async for reply in replies:
            if isinstance(reply, messages.VMs):
                return reply.vms
            if isinstance(reply, messages.Failed):
                raise LivemigError(f"{host}: {reply.message}")
    raise HostUnreachable(host, "it sent no list")
