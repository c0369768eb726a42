"""The HTTP client of the server API; starts the server on first use."""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any

import httpx

from skybatch.client.launcher import ensure_server
from skybatch.config import Home, server_ssl
from skybatch.config import home as current_home
from skybatch.errors import ServerError, SkyBatchError, error_from_payload

__all__ = ["Client", "partial_reduce"]

_CACHE: dict[object, Client] = {}
_CACHE_LOCK = threading.Lock()


def close_clients() -> None:
    """Close the shared clients (at exit, or when a deployment goes away)."""
    with _CACHE_LOCK:
        for client in _CACHE.values():
            client.close()
        _CACHE.clear()


atexit.register(close_clients)


class Client:
    """One deployment's API. ``Client.connect()`` finds (or starts) its server."""

    def __init__(self, url: str, token: str, home: Home) -> None:
        self.url = url
        self.home = home
        self._http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(120.0, connect=5.0),
            # An HTTPS server: its own certificate, from the home, and no other.
            verify=server_ssl(home, url) or True,
        )

    @classmethod
    def connect(cls, home: Home | None = None) -> Client:
        """The client of ``home``'s server (starting it if needed), shared within the process."""
        home = home or current_home()
        with _CACHE_LOCK:
            cached = _CACHE.get(home.root)
            if cached is not None:
                return cached
            client = cls._fresh(home)
            _CACHE[home.root] = client
            return client

    @classmethod
    def _fresh(cls, home: Home) -> Client:
        info = ensure_server(home)
        token = home.read_token()
        if not token:
            raise ServerError(f"the server of {home.root} runs but its token file is missing")
        return cls(info.url, token, home)

    def close(self) -> None:
        self._http.close()

    def reconnect(self, deadline: float) -> None:
        """After the server went away: wait for (or start) it again, until ``deadline``."""
        while True:
            try:
                fresh = Client._fresh(self.home)
                self._http.close()
                self._http = fresh._http
                self.url = fresh.url
                return
            except SkyBatchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.ConnectError:
                # Nothing was sent: find (or start) the server again and retry once.
                self.reconnect(time.monotonic() + 10)
                response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServerUnreachable(
                f"cannot reach the skybatch server at {self.url} ({type(e).__name__}); "
                "check `skybatch server status`"
            ) from None
        if response.status_code >= 400:
            try:
                body = response.json()["error"]
                error = error_from_payload(body["type"], body["message"])
            except (ValueError, KeyError, TypeError):
                raise ServerError(
                    f"the server answered {response.status_code}: {response.text[:300]}"
                ) from None
            # Raised out here: most skybatch errors are ValueErrors, caught just above.
            raise error
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # -- pools ---------------------------------------------------------------------------

    def apply_pool(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.json("POST", f"/v1/pools/{name}", json={"spec": spec})
        return result

    def get_pool(self, name: str, wait: float = 0) -> dict[str, Any]:
        result: dict[str, Any] = self.json(
            "GET", f"/v1/pools/{name}", params={"wait": wait}, timeout=wait + 30
        )
        return result

    def list_pools(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.json("GET", "/v1/pools")
        return result

    def down_pool(self, name: str) -> list[str]:
        left = self.request("DELETE", f"/v1/pools/{name}").json().get("left", [])
        return [str(line) for line in left]

    # -- jobs ----------------------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.json("POST", "/v1/jobs", json=body)
        return result

    def get_job(
        self, job_id: str, version: int = -1, wait: float = 0, interval: float = 0
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"version": version, "wait": wait}
        if interval:
            params["interval"] = interval
        result: dict[str, Any] = self.json(
            "GET", f"/v1/jobs/{job_id}", params=params, timeout=wait + 30
        )
        return result

    def list_jobs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.json("GET", "/v1/jobs")
        return result

    def prune(self, older_than_days: float | None, keep: int) -> list[int]:
        params: dict[str, Any] = {"keep": keep}
        if older_than_days is not None:
            params["older_than_days"] = older_than_days
        result: list[int] = self.json("POST", "/v1/jobs/prune", params=params)["pruned"]
        return result

    def resume(self, job_id: str, body: dict[str, Any] | None) -> dict[str, Any]:
        result: dict[str, Any] = self.json("POST", f"/v1/jobs/{job_id}/resume", json={"job": body})
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def reduce(self, job_id: str, writer: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.json(
            "POST", f"/v1/jobs/{job_id}/reduce", json={"writer": writer}, timeout=3600
        )
        return result

    def logs(
        self, job_id: str, worker: int | None, offsets: dict[int, int], wait: float = 0
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "offsets": ",".join(f"{w}:{o}" for w, o in offsets.items()),
            "wait": wait,
        }
        if worker is not None:
            params["worker"] = worker
        result: dict[str, Any] = self.json(
            "GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=wait + 30
        )
        return result


class ServerUnreachable(ServerError):
    """The server did not answer (it may be restarting)."""


def partial_reduce(job_id: str, writer: dict[str, Any]) -> dict[str, Any]:
    """``OutputWriter.reduce_results``: the server writes what the job committed."""
    return Client.connect().reduce(job_id, writer)
