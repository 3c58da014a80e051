"""alexrepro.core.signals: one exception carries the stop signal, and the exit code comes from it."""

from __future__ import annotations

import os
import signal

import pytest

from alexrepro.core.signals import Stopped, StopRequest, handling_stop_signals, stop_at_once


def test_the_exit_code_comes_from_the_signal_not_the_message():
    assert Stopped(signal.SIGINT, "anything at all").exit_code == 130
    assert Stopped(signal.SIGTERM, "stopped by SIGINT (a misleading text)").exit_code == 143
    assert Stopped(None, "stopped by a signal on another rank").exit_code == 1


def test_stop_at_once_raises_once_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    seen: list[int] = []
    with pytest.raises(Stopped, match=r"^stopped by SIGTERM; nothing was written$") as caught:
        with stop_at_once(lambda name: "nothing was written", seen):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a point where the handler runs
    assert caught.value.exit_code == 143 and seen == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_while_unwinding_is_ignored():
    with pytest.raises(Stopped) as caught:
        with stop_at_once(lambda name: "unwinding"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                signal.pthread_sigmask(signal.SIG_BLOCK, [])
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during the unwinding: no second exception
                signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert caught.value.signum == signal.SIGINT


def test_a_stop_request_stops_at_once_while_setting_up_and_asks_the_loop_after():
    with pytest.raises(Stopped, match="^stopped by SIGTERM while setting up$"):
        with StopRequest(lambda name: "while setting up"):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with StopRequest(lambda name: "while setting up") as stop:
        stop.begin()
        os.kill(os.getpid(), signal.SIGINT)
        signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert stop.signal == "SIGINT"  # noted, not raised: the loop finishes its step first
        stopped = stop.stopped("after step 3")
    assert str(stopped) == "stopped by SIGINT after step 3" and stopped.exit_code == 130


def test_handlers_are_installed_in_the_main_thread_only():
    import threading

    installed = []

    def elsewhere():
        with handling_stop_signals(lambda signum: None):
            installed.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(timeout=10)
    assert installed == [signal.getsignal(signal.SIGTERM)]
