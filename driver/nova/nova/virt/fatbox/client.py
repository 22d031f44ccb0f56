"""A blocking client of fatboxd's REST API over its unix socket.

Plain http.client on an AF_UNIX socket: no eventlet, no requests, so it behaves the same
under nova-compute's native threads and under eventlet's monkey-patched socket module.
One connection per call keeps it thread-safe without a pool; on a local socket a connect
costs tens of microseconds.
"""

import http.client
import json
import socket
import urllib.parse


class FatboxError(Exception):
    """fatboxd answered with an error status (or could not be reached)."""

    def __init__(self, status, message, method=None, path=None):
        super().__init__(f"{method} {path}: {status} {message}")
        self.status = status
        self.message = message
        self.method = method
        self.path = path


class NotFound(FatboxError):
    pass


class Conflict(FatboxError):
    pass


class Unreachable(FatboxError):
    pass


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._socket_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class Client:
    def __init__(self, socket_path, timeout=600.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method, path, body=None, query=None, timeout=None, raw=False):
        if query:
            path = path + "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = _UnixHTTPConnection(self.socket_path, timeout or self.timeout)
        try:
            try:
                try:
                    conn.request(method, path, body=data, headers=headers)
                    resp = conn.getresponse()
                except BrokenPipeError:
                    # The server may answer (404 for an unknown route) and close before
                    # reading the body: its answer is still in our receive buffer.
                    if conn.sock is None:
                        raise
                    resp = http.client.HTTPResponse(conn.sock, method=method)
                    resp.begin()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise Unreachable(None, f"fatboxd at {self.socket_path}: {e}", method, path) from e
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                msg = json.loads(payload).get("error", "")
            except (ValueError, AttributeError):
                msg = payload.decode("utf-8", "replace")
            cls = {404: NotFound, 409: Conflict}.get(resp.status, FatboxError)
            raise cls(resp.status, msg, method, path)
        if raw:
            return payload
        if not payload:
            return None
        return json.loads(payload)

    # The routes of driver/openapi.yaml.

    def list(self):
        return self.request("GET", "/v1/instances")

    def show(self, ident):
        return self.request("GET", f"/v1/instances/{urllib.parse.quote(ident)}")

    def create(self, spec):
        return self.request("POST", "/v1/instances", body=spec)

    def delete(self, ident):
        return self.request("DELETE", f"/v1/instances/{urllib.parse.quote(ident)}")

    def action(self, ident, action, timeout=None, **extra):
        body = {"action": action}
        if timeout is not None:
            body["timeout"] = int(timeout)
        body.update(extra)
        # A stop may wait `timeout` seconds for the guest: the socket must wait longer.
        t = None if timeout is None else max(self.timeout, timeout + 60)
        return self.request(
            "POST", f"/v1/instances/{urllib.parse.quote(ident)}/actions", body=body, timeout=t
        )

    def console(self, ident, nbytes=None):
        q = {"bytes": int(nbytes)} if nbytes else None
        return self.request(
            "GET", f"/v1/instances/{urllib.parse.quote(ident)}/console", query=q, raw=True
        )

    def serial_console(self, ident):
        """{"host", "port", "protocol": "tcp"}: a TCP port relaying raw bytes to the console
        (opened on first use, kept until delete); 501 when the host has them disabled."""
        return self.request(
            "POST", f"/v1/instances/{urllib.parse.quote(ident)}/serial-console"
        )

    def host(self):
        return self.request("GET", "/v1/host")

    def images(self):
        return self.request("GET", "/v1/images")
