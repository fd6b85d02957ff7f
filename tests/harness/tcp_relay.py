#!/usr/bin/env python3
"""tcp_relay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT

Forwards every TCP connection accepted on LISTEN_HOST:LISTEN_PORT to TARGET_HOST:TARGET_PORT,
byte for byte, both ways. tests/multinode_rbd.rs runs it inside a network namespace so that
one kiln node's PostgreSQL traffic crosses a veth link the test can cut: both legs (node to
relay, relay to server) then see a real cut, with no FIN and no RST. Prints "listening" once
it accepts connections; runs until killed.
"""

import socket
import sys
import threading


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(client: socket.socket, target: tuple) -> None:
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def main() -> None:
    listen_host, listen_port, target_host, target_port = sys.argv[1:5]
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((listen_host, int(listen_port)))
    server.listen(128)
    print("listening", flush=True)
    target = (target_host, int(target_port))
    while True:
        client, _ = server.accept()
        threading.Thread(target=serve, args=(client, target), daemon=True).start()


if __name__ == "__main__":
    main()
