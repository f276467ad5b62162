"""A loopback feedback API (docs/feedback-api.yaml): `GET /v1/feedback` with a bearer token,
`updated_since` (inclusive), `limit` and an opaque cursor; records ordered by (updated_at, id);
`next_cursor` is null on the last page. Scenario steps add records between simulated days."""

from __future__ import annotations

import base64
import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


_FAR = datetime.max.replace(tzinfo=timezone.utc)


def _ts(value) -> datetime:
    """A record's time; one the API cannot parse sorts last (the bot quarantines it)."""
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    except ValueError:
        return _FAR


class FeedbackApi:
    def __init__(self, token: str):
        self.token = token
        self.records: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.url = ""
        self._server = None

    def add(self, records: list[dict]) -> None:
        with self.lock:
            for r in records:
                self.records[r["id"]] = r

    def load_jsonl(self, path: str) -> list[dict]:
        rows = []
        with open(path) as f:
            for line in f:
                # An API sends JSON objects only: a line cut short in the file is not served.
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("id"), str):
                    rows.append(row)
        self.add(rows)
        return rows

    def _page(self, query: dict) -> tuple[int, dict]:
        def q(name):
            v = query.get(name)
            return v[-1] if v else None

        try:
            limit = int(q("limit") or 100)
        except ValueError:
            return 400, {"error": "limit is not an integer"}
        if not 1 <= limit <= 1000:
            return 400, {"error": f"limit {limit} is outside 1..1000"}
        since = q("updated_since")
        with self.lock:
            rows = sorted(self.records.values(), key=lambda r: (_ts(r.get("updated_at")), r["id"]))
        if since:
            try:
                since_ts = datetime.fromisoformat(since.replace("Z", "+00:00"))
            except ValueError:
                return 400, {"error": f"updated_since {since!r} is not an RFC 3339 time"}
            rows = [r for r in rows if _ts(r.get("updated_at")) >= since_ts]
        cursor = q("cursor")
        if cursor:
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(cursor.encode())))
            except Exception:
                return 400, {"error": "unknown cursor"}
            rows = [r for r in rows if (str(r.get("updated_at")), r["id"]) != after and (_ts(r.get("updated_at")), r["id"]) > (_ts(after[0]), after[1])]
        page = rows[:limit]
        nxt = None
        if len(rows) > limit:
            last = page[-1]
            nxt = base64.urlsafe_b64encode(json.dumps([str(last.get("updated_at")), last["id"]]).encode()).decode()
        return 200, {"data": page, "next_cursor": nxt}

    def start(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                split = urlsplit(self.path)
                with api.lock:
                    api.requests.append({"path": self.path})
                if split.path != "/v1/feedback":
                    status, payload = 404, {"error": "not found"}
                elif self.headers.get("Authorization") != f"Bearer {api.token}":
                    status, payload = 401, {"error": "missing or invalid token"}
                else:
                    status, payload = api._page(parse_qs(split.query))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
