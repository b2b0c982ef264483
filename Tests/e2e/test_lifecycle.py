"""Process lifecycle: SIGTERM/SIGINT close every client with 1001 and exit cleanly."""
import signal

import pytest

from rawws import RawClient


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_clients_with_1001_and_exits_zero(start_server, sig):
    server = start_server("--scripts", "scripts")
    clients = [RawClient(server.port) for _ in range(3)]
    for c in clients:
        c.send_frame(0x1, b"hi")
        assert c.recv_frame()[2] == b"Message received: hi"
    server.proc.send_signal(sig)
    for c in clients:
        assert c.recv_close() == 1001
        c.send_frame(0x8, b"\x03\xe9")  # answer the close handshake
        assert c.at_eof()
        c.close()
    assert server.proc.wait(timeout=10) == 0


def test_sigterm_right_after_the_banner_stops_the_server(start_server):
    """Signal handling is in place before the banner: a SIGTERM sent the moment the server says
    it listens is neither fatal (status -15) nor lost (a server that never stops)."""
    for _ in range(10):
        server = start_server("--scripts", "scripts/echo.lua", admin=False)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=10) == 0
