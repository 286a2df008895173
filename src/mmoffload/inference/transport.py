"""The rollout client's HTTP transport: one pooled ``httpx.Client`` (the ``client`` extra).

Bytes in, status and bytes out; the client above keeps the protocol, the JSON and
the retry policy, and never sees httpx. Loaded through ``extras.require``, so that
importing the client needs nothing optional.
"""

from __future__ import annotations

import httpx

from mmoffload.errors import UsageError


class ServerUnreachable(ConnectionError):
    """A request that never got an HTTP answer (connection refused, reset, timed out)."""


class HttpTransport:
    """POSTs JSON bodies over one ``httpx.Client``: pooled connections, safe to share between threads."""

    def __init__(self, timeout_s: float) -> None:
        # One limit for connect, read, write and waiting for a pooled connection: a generate call
        # may take minutes, and --concurrency threads share the pool (httpx's default is 100).
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s))

    def post(self, url: str, content: bytes) -> tuple[int, bytes]:
        """POST ``content`` as JSON to ``url``; return the HTTP status and the body, whatever the status.

        Raises:
            ServerUnreachable: no answer came (the client retries it).
            UsageError: ``url`` is not an http:// or https:// URL.
        """
        try:
            response = self._client.post(url, content=content, headers={"Content-Type": "application/json"})
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise UsageError(
                f"Expected the inference server as an http:// or https:// URL (http://HOST:PORT), got `{url}`: {exc}"
            ) from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{type(exc).__name__}: {exc}") from exc
        return response.status_code, response.content

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()
