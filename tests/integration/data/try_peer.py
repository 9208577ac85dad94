"""Play a peer daemon from inside a test bed host: connect to a daemon as told, and if
let in, ask it to reserve a VM. Prints one JSON line: what happened.

    python try_peer.py '{"ip": ..., "me": ..., "peer_name": ..., "tls": "files"|"bare"|null,
                         "ca": ..., "cert": ..., "key": ..., "key_file": ..., "spec": {...}}'
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import msgspec

from livemig.errors import LivemigError
from livemig.keys import HostFiles
from livemig.wire import channel, messages, tls
from livemig.wire.frames import PeerAborted, PeerNotTrusted


async def main(args: dict[str, Any]) -> dict[str, Any]:
    context: ssl.SSLContext | None = None
    if args["tls"] == "files":
        context = tls.client_context(HostFiles(Path(args["ca"]), Path(args["cert"]),
                                               Path(args["key"])))
    elif args["tls"] == "bare":  # TLS 1.3 and our CA, but no certificate of our own
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cafile=args["ca"])
    try:
        peer = await channel.connect(args["ip"], 7477, key=Path(args["key_file"]).read_bytes(),
                                     me=args["me"], ssl=context,
                                     peer_name=args["peer_name"] if context else None,
                                     timeout=10)
    except LivemigError as exc:
        return describe(exc, "connect")
    try:
        request = messages.Reserve(spec=msgspec.convert(args["spec"], messages.VMSpecFields),
                                   source=args["me"])
        reply = await peer.ask(request, messages.Reserved, timeout=30)
        return {"stage": "reserve", "error": None,
                "ok": not isinstance(reply, messages.Refusal), "body": msgspec.to_builtins(reply)}
    except LivemigError as exc:
        return describe(exc, "reserve")
    finally:
        await peer.abort("test over")


def describe(exc: LivemigError, stage: str) -> dict[str, Any]:
    out: dict[str, Any] = {"stage": stage, "error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, PeerNotTrusted):
        out["by_peer"] = exc.by_peer
    if isinstance(exc, PeerAborted):
        out["reason"] = exc.reason
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
