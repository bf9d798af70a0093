"""gunicorn's gevent worker, answering the errors gunicorn raises itself (a request line or
headers over its limits, a malformed request) with tinkerd's JSON error body rather than an HTML
page, as every other error of the API is answered."""

from __future__ import annotations

import json
import socket

from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

from tinkerd.types import error_body, status_error


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    error = status_error(f"{reason}: {mesg}" if mesg else reason, status_int)
    body = json.dumps(error_body(error))
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin1") + body.encode())


class JsonErrorWorker(GeventWorker):
    def init_process(self) -> None:
        # gunicorn's error path calls util.write_error (an HTML page): swap in the JSON one for
        # this worker process before it serves.
        util.write_error = write_json_error
        super().init_process()
