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
from collections.abc import AsyncGenerator, Awaitable, Callable
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
    """The shared peer key at ``path``, which the daemon and this host's CLI both use."""
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise config.ConfigError(path, f"cannot read the peer key ({exc.strerror}); every "
                                       f"host holds the same 32 random bytes there "
                                       f"(docs/real-hosts.md)") from exc
    if len(key) < frames.MIN_KEY_BYTES:
        raise config.ConfigError(path, f"the peer key holds {len(key)} bytes, fewer than "
                                       f"the {frames.MIN_KEY_BYTES} a key needs")
    return key


def client_context(here: config.HostConfig) -> tls.Contexts | None:
    """This host's TLS identity for calling others; None where it has no TLS files
    (daemons started --insecure-plaintext)."""
    files = keys.HostFiles.in_dir(here.tls_dir, here.name)
    return None if files.missing() else tls.Contexts(files)


async def vms_of(hosts: list[str], ask: Callable[[str], Awaitable[list[messages.VMInfo]]],
                 ) -> tuple[list[messages.VMInfo], dict[str, LivemigError | OSError]]:
    """What ``ask`` says each host runs, all asked at once; and the hosts that did not
    answer, with why."""
    answers = await asyncio.gather(*(ask(h) for h in hosts), return_exceptions=True)
    vms: list[messages.VMInfo] = []
    silent: dict[str, LivemigError | OSError] = {}
    for host, answer in zip(hosts, answers, strict=True):
        if isinstance(answer, LivemigError | OSError):
            silent[host] = answer
        elif isinstance(answer, BaseException):
            raise answer
        else:
            vms += answer
    return vms, silent


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
