"""A Hub-compatible HTTP server on 127.0.0.1 for push/pull tests: just the endpoints huggingface_hub uses to
create a repo, commit files (regular, base64) and download them, with a bearer-token check on writes.

Start with `HubServer(token).start()`; point a process at it with `HF_ENDPOINT=server.url` set before
huggingface_hub is imported.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubServer:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "sha": str}
        self.commits: list[dict] = []  # every commit received: repo, summary, files
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._running = False

    def start(self) -> "HubServer":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._running = True
        return self

    def stop(self) -> None:
        if self._running:  # shutdown() waits for serve_forever, which only a started server runs
            self._server.shutdown()
        self._server.server_close()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # ------------------------------------------------------------ plumbing
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            self._json(status, {"error": message}, {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(401, "Invalid credentials in Authorization header")
                return False
            return True

        def _repo(self, repo_id: str, head: bool = False) -> dict | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                           head=head)
            return repo

        # ------------------------------------------------------------ writes
        def do_POST(self) -> None:
            path = unquote(urlparse(self.path).path)
            body = self._body()
            if path == "/api/validate-yaml":
                return self._json(200, {})
            if not self._authorized():
                return None
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") \
                    else f"tester/{request['name']}"
                if repo_id in hub.repos:  # as the Hub: the conflict names the existing repo
                    message = "You already created this model repo"
                    return self._json(409, {"error": message, "url": f"{hub.url}/{repo_id}"},
                                      {"X-Error-Message": message})
                hub.repos[repo_id] = {"private": request.get("visibility") == "private" or bool(request.get("private")), "files": {}, "sha": "0" * 40,
                                     "branches": {"main"}}
                return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            match = re.fullmatch(r"/api/models/(.+)/branch/([^/]+)", path)
            if match is not None:
                repo = self._repo(match[1])
                if repo is None:
                    return None
                if match[2] in repo["branches"]:
                    return self._error(409, "Reference already exists")
                repo["branches"].add(match[2])
                return self._json(200, {})
            match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
            if match is None:
                return self._error(404, f"no endpoint {path}")
            repo = self._repo(match[1])
            if repo is None:
                return None
            if match[3] not in repo["branches"]:  # as the Hub: a commit needs an existing branch
                return self._error(404, f"Invalid rev id: {match[3]}", "RevisionNotFound")
            if match[2] == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            added = {}
            for line in lines[1:]:
                if line["key"] != "file":
                    return self._error(400, f"unsupported commit operation {line['key']}")
                added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            repo["files"].update(added)
            repo["sha"] = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest())
                                                          for k, v in repo["files"].items())).encode()).hexdigest()
            hub.commits.append({"repo": match[1], "summary": lines[0]["value"]["summary"], "files": sorted(added),
                                "revision": match[3]})
            return self._json(200, {"commitUrl": f"{hub.url}/{match[1]}/commit/{repo['sha']}",
                                    "commitOid": repo["sha"], "pullRequestUrl": None})

        # ------------------------------------------------------------ reads
        def do_HEAD(self) -> None:
            self._read(head=True)

        def do_GET(self) -> None:
            self._read(head=False)

        def _read(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            if path == "/api/whoami-v2":
                if self._authorized():
                    self._json(200, {"type": "user", "name": "tester", "orgs": []})
                return
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if match:
                repo = self._repo(match[1], head)
                if repo is not None:
                    self._json(200, {"id": match[1], "sha": repo["sha"], "private": repo["private"],
                                     "siblings": [{"rfilename": name} for name in sorted(repo["files"])]})
                return
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if match is None:
                return self._send(404, b"", head=head)
            repo = self._repo(match[1], head)
            if repo is None:
                return None
            content = repo["files"].get(match[3])
            if content is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
                                  head=head)
            return self._send(200, content, {"ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                                             "X-Repo-Commit": repo["sha"]}, head=head)

    return Handler
