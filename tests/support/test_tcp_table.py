"""``held_connections`` against sockets this test makes itself."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.support.tcp_table import HeldConnections, held_connections


def test_counts_accepted_and_queued_connections_on_the_port_only() -> None:
    with socket.socket() as listener, socket.socket() as other_listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        other_listener.bind(("127.0.0.1", 0))
        other_listener.listen(8)
        assert held_connections(os.getpid(), port) == HeldConnections(0, 0)

        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        elsewhere = socket.create_connection(other_listener.getsockname())
        accepted, _ = listener.accept()
        try:
            # The clients' ends are this process's too, but their local ports are not
            # ``port``; one server end accepted, two waiting in the accept queue.
            held = held_connections(os.getpid(), port)
            assert held == HeldConnections(established=1, queued=2)
            assert held.total == 3
        finally:
            accepted.close()
            elsewhere.close()
            for client in clients:
                client.close()


def test_sockets_of_another_process_are_not_counted() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        child = subprocess.Popen(["sleep", "30"])
        try:
            with socket.create_connection(("127.0.0.1", port)):
                assert held_connections(child.pid, port) == HeldConnections(0, 0)
        finally:
            child.kill()
            child.wait()
