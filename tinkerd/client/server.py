"""The connection a client command talks through: plain REST calls to a tinkerd server, SDK
clients on the same URL and key, and ClientError, the one failure a command reports."""

from __future__ import annotations

import logging
import re
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
log = logging.getLogger(__name__)
DEFAULT_API_KEY = "tml-local"


class ClientError(Exception):
    """What went wrong, for the user; the command exits with status 1."""


class Server:
    """A tinkerd server: plain REST calls, and SDK clients on the same URL and key."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._sessions: list[Any] = []  # ServiceClients to close before the process exits

    def close(self, status: str) -> None:
        """End the SDK sessions this command opened: their background thread must not be
        writing (a heartbeat warning) while the interpreter shuts down, which aborts it."""
        for client in self._sessions:
            try:
                client.close(status).result(timeout=10)
            except Exception as e:  # the server is gone: nothing left to end
                log.debug("closing an SDK session: %s", e)

    def request(self, method: str, path: str, timeout: float = 30.0, **kwargs: Any) -> Any:
        import httpx

        try:
            response = httpx.request(
                method,
                self.url + path,
                headers={"X-API-Key": self.api_key},
                timeout=httpx.Timeout(timeout, connect=5.0),
                **kwargs,
            )
        except httpx.HTTPError as e:
            raise ClientError(
                f"cannot reach tinkerd at {self.url} ({e}); start one with `tinkerd serve` "
                "or point --url / TINKERD_URL at it"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and "error" in body:
                raise ClientError(str(body["error"]))
            raise ClientError(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
        return body

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any], timeout: float = 30.0) -> Any:
        return self.request("POST", path, json=body, timeout=timeout)

    def check(self) -> None:
        """Fail fast with a clear message when no server answers (the SDK would keep retrying)."""
        self.get("/api/v1/healthz")

    def wait(self, request_id: str) -> dict[str, Any]:
        """A future's result (long-polled); ClientError if the request failed."""
        while True:
            result = self.post("/api/v1/retrieve_future", {"request_id": request_id}, 60.0)
            if result.get("type") != "try_again":
                break
        if "error" in result:
            raise ClientError(str(result["error"]))
        return result

    def service_client(self):
        import tinker

        self.check()
        client = tinker.ServiceClient(base_url=self.url, api_key=self.api_key)
        self._sessions.append(client)
        return client

    def rest_client(self):
        import tinker

        self.check()
        return tinker.RestClient(base_url=self.url, api_key=self.api_key)


def sdk_error_message(e: BaseException) -> str:
    """The server's own message inside an SDK exception, when it has one."""
    body = getattr(e, "body", None)
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    # A failed future: the SDK wraps the server's message in its own reprs.
    failed = re.fullmatch(r"Request failed: (.*) for self\.request_id=.*", str(e), re.S)
    if failed:
        return failed.group(1)
    return str(e) or type(e).__name__
