"""The one root of every error livemig raises on purpose.

    LivemigError
     ├── SetupError          the host lacks something livemig needs (a package, an image)
     ├── BadName             a VM, image or instance name that cannot be one (also a ValueError)
     ├── TestbedError        the test bed is missing, half-built, or asked for an unknown host
     ├── VMError             about one VM (carries .vm)
     │    ├── VMNotFound
     │    ├── VMExists
     │    ├── QEMUCrashed    carries QEMU's stderr and the console's tail
     │    └── GuestTimeout   the guest did not reach a state in time
     ├── AgentError          the guest agent answered with an error, or not at all
     ├── MigrationError      a migration did not complete (carries .vm, .stage, .vm_runs_on)
     │    ├── ReservationRefused  the destination cannot hold the VM (memory, disk, name)
     │    └── MigrationCancelled  an operator cancelled it
     ├── IllegalTransition   (migration.stages) an event the current stage does not accept
     ├── PlannerStateError   (migration.planner) the planner called out of order
     ├── DirtyLogUnavailable (vm.dirtylog) the kernel dirty log cannot track this QEMU
     ├── ControlMessageError (wire.messages) a control line that is not one of our messages
     │    └── ControlVersionMismatch  from another release (.theirs, .ours)
     └── WireError           (wire.frames) one connection to another daemon (carries .peer)
          ├── LocalProtocolError   we broke the protocol: a bug
          ├── RemoteProtocolError  the peer broke it (VersionMismatch, FrameTooLarge, ...)
          ├── AuthenticationError  the peer does not hold our key
          ├── PeerAborted          the peer gave up and said why
          ├── PeerLost             the connection ended (PeerUnreachable: never began)
          └── PeerTimeout          the peer did not do something in time

The subclasses defined elsewhere live beside the code that raises them.

Every error says in its message what a person can do about it; the fields carry the same
facts for programs. Foreign exceptions are translated at the boundary with ``raise ... from``.
"""

from __future__ import annotations


class LivemigError(Exception):
    """Root of livemig's errors. ``str(err)`` is one sentence an operator can act on."""


class SetupError(LivemigError):
    """The host is missing something: run ``make setup``."""


class BadName(LivemigError, ValueError):
    """A name that would not be safe as part of a file path or a namespace.

    Also a ``ValueError``, so code that validates peer data with ``except ValueError``
    (a VM spec from another daemon) refuses it like any other malformed value.
    """

    def __init__(self, what: str, name: str, rule: str) -> None:
        super().__init__(f"{what} {name!r} is not allowed: {rule}")
        self.what = what
        self.name = name


class TestbedError(LivemigError):
    """The test bed is not up, or a named host is not part of it."""

    __test__ = False  # not a pytest test class, despite the name


class VMError(LivemigError):
    def __init__(self, vm: str, message: str) -> None:
        super().__init__(message)
        self.vm = vm


def _last_words(console: str) -> str:
    """The console line that best says why a guest stopped: a panic or an OOM kill comes
    a few lines before the last one; else the last line."""
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    for marker in ("Kernel panic", "Out of memory"):
        if found := next((line for line in reversed(lines) if marker in line), None):
            return found[:200]
    return lines[-1][:200] if lines else ""


class VMNotFound(VMError):
    def __init__(self, vm: str, extra: str = "") -> None:
        """``extra`` says why the VM may be there nonetheless (a host that did not answer)."""
        super().__init__(vm, f"no VM named {vm!r}{extra}" if extra else
                         f"no VM named {vm!r}; 'livemig vm list --all' shows the VMs there are")


class VMExists(VMError):
    def __init__(self, vm: str, host: str) -> None:
        super().__init__(vm, f"a VM named {vm!r} already runs on {host}; choose another name")
        self.host = host


class QEMUCrashed(VMError):
    def __init__(self, vm: str, returncode: int | None, stderr: str, console_tail: str) -> None:
        # QEMU says nothing when the guest panicked: then the console tells.
        if stderr.strip():
            detail = stderr.strip().splitlines()[-1]
        elif words := _last_words(console_tail):
            detail = f"the guest's console ended with {words!r}"
        else:
            detail = "no message on stderr"
        super().__init__(vm, f"QEMU for VM {vm!r} exited (status {returncode}): {detail}")
        self.returncode = returncode
        self.stderr = stderr
        self.console_tail = console_tail


class GuestTimeout(VMError):
    def __init__(self, vm: str, what: str, seconds: float, console_tail: str = "") -> None:
        # The console log goes with the VM that failed to start; its telling line stays.
        words = _last_words(console_tail)
        hint = f"its console's last words: {words!r}" if words else "see its console log"
        super().__init__(vm, f"VM {vm!r}: {what} did not happen within {seconds:g} s; {hint}")
        self.what = what
        self.seconds = seconds
        self.console_tail = console_tail


class AgentError(LivemigError):
    def __init__(self, vm: str, request: str, reply: str) -> None:
        super().__init__(f"guest agent of VM {vm!r} refused {request!r}: {reply}")
        self.vm = vm
        self.request = request
        self.reply = reply


class MigrationError(LivemigError):
    """A migration stopped short. ``stage`` is where; ``vm_runs_on`` says where the VM is."""

    def __init__(self, vm: str, stage: str, message: str, vm_runs_on: str | None) -> None:
        super().__init__(message)
        self.vm = vm
        self.stage = stage
        self.vm_runs_on = vm_runs_on


class ReservationRefused(MigrationError):
    pass


class MigrationCancelled(MigrationError):
    pass
