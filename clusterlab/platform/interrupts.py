"""SIGINT (Ctrl+C) and SIGTERM (``kill``, a scheduler's stop) end every command the same way.

Whatever the phase (start-up, training, evaluation, a sweep), either signal raises
:class:`Interrupted` in the main thread; the command marks its runs KILLED with a
``failure_reason`` naming the signal, stops the Ray work it started, and exits
``128 + signal`` (130 for SIGINT, 143 for SIGTERM). Checkpoints are written atomically, so an
interrupted run continues from its last one under the same ``--run-name`` (a sweep with
``--resume``).

Ray installs handlers of its own that would each end the command differently: ``ray.init``
one for SIGTERM (it kills the local Ray and exits 1, or 15 before its node is up); Ray Train's
``fit`` one for SIGINT (it aborts the run and exits 0 from inside ``fit``, and stays installed
afterwards, so a Ctrl+C during evaluation would be swallowed); Tune's ``fit`` one for SIGINT
(it stops the trials and saves the experiment state, then returns). Hence: the handler is
taken back after ``ray.init`` (:func:`reclaim_signals`), Ray Train's ``fit`` runs off the main
thread, where Train installs nothing (:func:`call_off_main_thread`, as Tune runs it), and a
sweep turns both signals into Tune's own graceful stop (:func:`stop_tune_gracefully`).

A handler's exception is lost when the signal lands in code whose exceptions Python only
reports ("Exception ignored in ..."): an at-fork hook while ``ray.init`` spawns its processes,
a ``__del__``, a weakref callback. The signal is therefore also remembered, and
:func:`reclaim_signals` and :func:`call_off_main_thread` raise it if it was swallowed.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

HANDLED = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """The command was stopped by ``signum``. A KeyboardInterrupt, so that code written for
    Ctrl+C (``except KeyboardInterrupt``) treats SIGTERM alike."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 SIGINT, 143 SIGTERM."""
        return 128 + self.signum


def as_interrupted(exc: KeyboardInterrupt) -> Interrupted:
    """A plain KeyboardInterrupt (Python's default SIGINT handler) is a SIGINT."""
    return exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)


_catching = False  # whether a command is inside catch_signals(): only then is a handler taken back
_received: int | None = None  # the signal caught inside catch_signals(), kept in case it was swallowed


def _raise_interrupted(signum: int, frame: Any) -> None:
    global _received
    _received = signum
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise the :class:`Interrupted` a signal caught earlier in this command raised where it was
    swallowed (a no-op when none was caught: one that propagated never reaches here)."""
    if _received is not None:
        raise Interrupted(_received)


@contextmanager
def catch_signals() -> Iterator[None]:
    """For the duration of a command: SIGINT and SIGTERM raise :class:`Interrupted` in the main
    thread. Outside the main thread (a library caller's worker thread) nothing is installed."""
    global _catching, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    _catching, _received = True, None
    reclaim_signals()
    try:
        yield
    finally:
        _catching, _received = False, None
        for s, handler in previous.items():
            signal.signal(s, handler)


def reclaim_signals() -> None:
    """Install the :class:`Interrupted` handler again after a library replaced it (``ray.init``
    installs its own SIGTERM handler), and raise a signal that library swallowed. A no-op outside
    :func:`catch_signals`."""
    if _catching and threading.current_thread() is threading.main_thread():
        for s in HANDLED:
            signal.signal(s, _raise_interrupted)
        raise_if_interrupted()


@contextmanager
def around_ray_init(interval_s: float = 1.0) -> Iterator[None]:
    """Around ``ray.init`` in the main thread, inside :func:`catch_signals`. ``ray.init`` first
    installs its own SIGTERM handler (``sys.exit``), then spawns its processes; a signal landing
    in one of its at-fork hooks has its exception swallowed ("Exception ignored"), and the command
    then waits forever on a Ray whose processes died with the signal. So ``ray.init`` is kept
    from installing that handler (``ray._private.utils.set_sigterm_handler``, which it calls):
    ours stays and remembers the signal; and a remembered signal is sent to the main thread
    again every ``interval_s`` seconds until its :class:`Interrupted` propagates."""
    import ray._private.utils as ray_utils

    main = threading.main_thread()
    if not _catching or threading.current_thread() is not main:
        yield
        return
    done = threading.Event()

    def redeliver() -> None:
        while not done.wait(interval_s):
            if _received is not None and not done.is_set():
                signal.pthread_kill(main.ident, _received)

    install, ray_utils.set_sigterm_handler = ray_utils.set_sigterm_handler, lambda handler: None
    threading.Thread(target=redeliver, name="clusterlab-redeliver", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        ray_utils.set_sigterm_handler = install


def call_off_main_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a helper thread while the main thread waits, so that the signals keep
    raising :class:`Interrupted` in the main thread (Ray Train's ``fit`` installs its own SIGINT
    handler only when called from the main thread). An exception of ``fn`` is raised here. On
    :class:`Interrupted` the helper is left running: the caller stops what it waits on
    (``ray.shutdown()``)."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc

    helper = threading.Thread(target=target, name="clusterlab-fit", daemon=True)
    helper.start()
    helper.join()  # interruptible: a signal handler runs, and its exception propagates, while waiting
    raise_if_interrupted()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextmanager
def stop_tune_gracefully() -> Iterator[Callable[[], Interrupted | None]]:
    """Around ``Tuner.fit()``: the first SIGINT or SIGTERM asks Tune to stop its trials and save
    the experiment state (Tune stops gracefully on SIGUSR1, which it installs in ``fit``), a
    second one interrupts at once. Yields a function telling which signal stopped the sweep, if
    any; Tune's own SIGINT handler is disabled so that both signals take this path."""
    received: list[int] = []

    def request_stop(signum: int, frame: Any) -> None:
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if received or not tune_listens:  # a second signal, or Tune not yet (or no longer) listening
            raise Interrupted(signum)
        received.append(signum)
        os.kill(os.getpid(), signal.SIGUSR1)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in HANDLED}
    saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    if in_main:
        for s in HANDLED:
            signal.signal(s, request_stop)
    try:
        yield lambda: Interrupted(received[0]) if received else None
    finally:
        if saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env
        if in_main:
            for s, handler in previous.items():
                signal.signal(s, handler)
