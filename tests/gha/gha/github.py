"""A small, stateful GitHub: a real bare git repository plus the REST calls rlhf-bot makes.

Two loopback HTTP servers share one state, as github.com and api.github.com do:

- the API server (`api_url`): the Git Data API (refs, commits, blobs, trees), pull requests,
  labels, requested reviewers and issue comments, each backed by the bare repository through git
  plumbing (`hash-object -w`, `read-tree`/`update-index`/`write-tree`, `commit-tree`,
  `update-ref`). Responses carry the fields GitHub's do that clients read (number, html_url,
  state, merged_at, head.ref/sha/repo.full_name, base.ref, draft, ...). Every request is logged;
  one this server does not implement gets a 404 and is listed in `unhandled`, so a test can fail
  on it instead of passing by accident.
- the web server (`server_url`): release assets at `/{owner}/{repo}/releases/download/{tag}/
  {asset}`, answered with a 302 to an object URL as GitHub does (a client that does not follow
  redirects fails here as it would there).

Tokens: each has a permission map (`contents`, `pull-requests`, `issues`: read|write); a request
needs read for GETs and write for changes, else 403 as GitHub answers an under-privileged
GITHUB_TOKEN ("Resource not accessible by integration"). The harness (not the API) merges or
closes pull requests, which fires the push event a merge causes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git(repo: str, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
    full_env = dict(os.environ)
    full_env.update(
        {
            "GIT_AUTHOR_NAME": "GitHub",
            "GIT_AUTHOR_EMAIL": "noreply@github.com",
            "GIT_COMMITTER_NAME": "GitHub",
            "GIT_COMMITTER_EMAIL": "noreply@github.com",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": repo,
        }
    )
    if env:
        full_env.update(env)
    out = subprocess.run(
        ["git", "--git-dir", repo, *args], input=input, capture_output=True, env=full_env
    )
    if out.returncode != 0:
        raise GitError(f"git {' '.join(args)}: {out.stderr.decode(errors='replace').strip()}")
    return out.stdout.decode()


class GitError(Exception):
    pass


class ApiError(Exception):
    def __init__(self, status: int, message: str, errors: list | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


READ, WRITE = "read", "write"


class GitHub:
    """State of one simulated repository and its API."""

    def __init__(self, root: str, owner: str, repo: str, default_branch: str = "main"):
        self.root = root
        self.owner = owner
        self.name = repo
        self.full_name = f"{owner}/{repo}"
        self.default_branch = default_branch
        self.bare = os.path.join(root, "github", owner, repo + ".git")
        self.releases_dir = os.path.join(root, "github-releases")
        os.makedirs(self.bare, exist_ok=True)
        if not os.path.exists(os.path.join(self.bare, "HEAD")):
            subprocess.run(["git", "init", "--bare", "-q", "-b", default_branch, self.bare], check=True)
        self.lock = threading.RLock()
        self.pulls: dict[int, dict] = {}
        self.comments: dict[int, list] = {}
        self.next_number = 1
        self.next_id = 1000
        self.tokens: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.unhandled: list[dict] = []
        self.tampered: dict[tuple, bytes] = {}
        self.api_url = ""
        self.server_url = ""
        self._servers = []

    # ---- tokens ------------------------------------------------------------------------------

    def add_token(self, token: str, permissions: dict[str, str], login: str = "github-actions[bot]") -> None:
        self.tokens[token] = {"permissions": permissions, "login": login}

    def revoke_token(self, token: str) -> None:
        self.tokens.pop(token, None)

    # ---- git helpers -------------------------------------------------------------------------

    def git(self, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        return git(self.bare, *args, input=input, env=env)

    def ref_sha(self, ref: str) -> str | None:
        try:
            return self.git("rev-parse", "--verify", "-q", ref + "^{commit}").strip() or None
        except GitError:
            return None

    def is_ancestor(self, a: str, b: str) -> bool:
        r = subprocess.run(["git", "--git-dir", self.bare, "merge-base", "--is-ancestor", a, b])
        return r.returncode == 0

    def commit_files(self, branch: str, files: dict[str, bytes | None], message: str, author: str = "Alice <alice@example.com>") -> str:
        """A human's push: writes `files` (None deletes) on top of `branch` and moves it."""
        with self.lock:
            parent = self.ref_sha(f"refs/heads/{branch}")
            index = os.path.join(self.root, f"index-{os.getpid()}-{threading.get_ident()}")
            env = {"GIT_INDEX_FILE": index}
            if os.path.exists(index):
                os.remove(index)
            if parent:
                self.git("read-tree", parent, env=env)
            for path, content in files.items():
                if content is None:
                    self.git("update-index", "--force-remove", path, env=env)
                else:
                    sha = self.git("hash-object", "-w", "--stdin", input=content).strip()
                    self.git("update-index", "--add", "--cacheinfo", f"100644,{sha},{path}", env=env)
            tree = self.git("write-tree", env=env).strip()
            os.remove(index)
            name, email = re.match(r"(.*) <(.*)>", author).groups()
            ident = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
            args = ["commit-tree", tree, "-m", message]
            if parent:
                args[2:2] = ["-p", parent]
            sha = self.git(*args, env=ident).strip()
            self.git("update-ref", f"refs/heads/{branch}", sha, *([parent] if parent else []))
            return sha

    def read_file(self, ref: str, path: str) -> bytes | None:
        try:
            return subprocess.run(
                ["git", "--git-dir", self.bare, "show", f"{ref}:{path}"], capture_output=True, check=True
            ).stdout
        except subprocess.CalledProcessError:
            return None

    def changed_files(self, before: str | None, after: str) -> list[str]:
        if not before:
            return [p for p in self.git("ls-tree", "-r", "--name-only", after).splitlines() if p]
        return [p for p in self.git("diff", "--name-only", before, after).splitlines() if p]

    def branches(self) -> dict[str, str]:
        out = {}
        for line in self.git("for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads").splitlines():
            name, sha = line.rsplit(" ", 1)
            out[name] = sha
        return out

    # ---- pull requests: the harness's hands ----------------------------------------------------

    def merge_pull(self, number: int, merger: str = "Alice <alice@example.com>") -> dict:
        """Merges like the "Create a merge commit" button: a merge commit of head into base (a
        conflict is an error). Returns the push event's (ref, before, after)."""
        with self.lock:
            pr = self.pulls[number]
            if pr["state"] != "open":
                raise ApiError(405, f"pull request #{number} is not open")
            base = pr["base"]["ref"]
            before = self.ref_sha(f"refs/heads/{base}")
            head = self.ref_sha(f"refs/heads/{pr['head']['ref']}")
            result = subprocess.run(
                ["git", "--git-dir", self.bare, "merge-tree", "--write-tree", before, head],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise ApiError(405, f"pull request #{number} has conflicts: {result.stdout}")
            tree = result.stdout.splitlines()[0].strip()
            name, email = re.match(r"(.*) <(.*)>", merger).groups()
            ident = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": "GitHub", "GIT_COMMITTER_EMAIL": "noreply@github.com"}
            msg = f"Merge pull request #{number} from {self.owner}/{pr['head']['ref']}\n\n{pr['title']}"
            after = self.git("commit-tree", tree, "-p", before, "-p", head, "-m", msg, env=ident).strip()
            self.git("update-ref", f"refs/heads/{base}", after, before)
            ts = now_iso()
            pr.update(state="closed", merged_at=ts, closed_at=ts, updated_at=ts, merge_commit_sha=after, merged=True)
            return {"ref": f"refs/heads/{base}", "before": before, "after": after}

    def close_pull(self, number: int) -> None:
        with self.lock:
            pr = self.pulls[number]
            ts = now_iso()
            pr.update(state="closed", closed_at=ts, updated_at=ts)

    # ---- release assets ------------------------------------------------------------------------

    def publish_release(self, repo: str, tag: str, binary: str) -> dict[str, str]:
        """A release of `repo` at `tag` whose CPU and CUDA tarballs both hold `binary` as
        `rlhf-bot`, as the release workflow packs them. Returns asset name -> sha256."""
        # Debug info out, as a release build has none: a debug binary is ~8x larger.
        stripped = os.path.join(self.root, "rlhf-bot.stripped")
        if subprocess.run(["strip", "--strip-debug", "-o", stripped, binary], capture_output=True).returncode == 0:
            binary = stripped
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz", compresslevel=1) as tar:
            info = tar.gettarinfo(binary, arcname="rlhf-bot")
            info.mode = 0o755
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(binary, "rb") as f:
                tar.addfile(info, f)
        payload = data.getvalue()
        digest = hashlib.sha256(payload).hexdigest()
        out = {}
        d = os.path.join(self.releases_dir, repo, tag)
        os.makedirs(d, exist_ok=True)
        for asset in ("rlhf-bot-x86_64-unknown-linux-gnu.tar.gz", "rlhf-bot-cuda-x86_64-unknown-linux-gnu.tar.gz"):
            with open(os.path.join(d, asset), "wb") as f:
                f.write(payload)
            with open(os.path.join(d, asset + ".sha256"), "w") as f:
                f.write(f"{digest}  {asset}\n")
            out[asset] = digest
        return out

    def tamper_release(self, repo: str, tag: str, asset: str, on: bool = True) -> None:
        """Serve a different tarball for `asset` (same name, same published sha256 file)."""
        key = (repo, tag, asset)
        if not on:
            self.tampered.pop(key, None)
            return
        data = io.BytesIO()
        script = b"#!/bin/sh\necho tampered\n"
        with tarfile.open(fileobj=data, mode="w:gz") as tar:
            info = tarfile.TarInfo("rlhf-bot")
            info.size = len(script)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(script))
        self.tampered[key] = data.getvalue()

    # ---- JSON shapes -------------------------------------------------------------------------

    def _repo_json(self) -> dict:
        return {
            "id": 1,
            "name": self.name,
            "full_name": self.full_name,
            "owner": {"login": self.owner, "type": "Organization"},
            "private": True,
            "html_url": f"{self.server_url}/{self.full_name}",
            "url": f"{self.api_url}/repos/{self.full_name}",
            "default_branch": self.default_branch,
            "fork": False,
        }

    def _pull_json(self, pr: dict) -> dict:
        out = {k: v for k, v in pr.items() if not k.startswith("_")}
        head_sha = self.ref_sha(f"refs/heads/{pr['head']['ref']}") or pr["head"]["sha"]
        out["head"] = dict(pr["head"], sha=head_sha)
        if pr["state"] == "open":
            out["base"] = dict(pr["base"], sha=self.ref_sha(f"refs/heads/{pr['base']['ref']}"))
        return out

    def _commit_json(self, sha: str) -> dict:
        raw = self.git("cat-file", "commit", sha)
        header, _, message = raw.partition("\n\n")
        tree, parents, author, committer = None, [], None, None
        for line in header.splitlines():
            key, _, rest = line.partition(" ")
            if key == "tree":
                tree = rest
            elif key == "parent":
                parents.append(rest)
            elif key in ("author", "committer"):
                m = re.match(r"(.*) <(.*)> (\d+) ([+-]\d{4})", rest)
                ident = {
                    "name": m.group(1),
                    "email": m.group(2),
                    "date": datetime.fromtimestamp(int(m.group(3)), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                if key == "author":
                    author = ident
                else:
                    committer = ident
        base = f"{self.api_url}/repos/{self.full_name}"
        return {
            "sha": sha,
            "node_id": "C_" + sha[:12],
            "url": f"{base}/git/commits/{sha}",
            "html_url": f"{self.server_url}/{self.full_name}/commit/{sha}",
            "author": author,
            "committer": committer,
            "message": message,
            "tree": {"sha": tree, "url": f"{base}/git/trees/{tree}"},
            "parents": [{"sha": p, "url": f"{base}/git/commits/{p}", "html_url": f"{self.server_url}/{self.full_name}/commit/{p}"} for p in parents],
            "verification": {"verified": False, "reason": "unsigned", "signature": None, "payload": None},
        }

    def _ref_json(self, ref: str, sha: str) -> dict:
        return {
            "ref": ref,
            "node_id": "REF_" + sha[:8],
            "url": f"{self.api_url}/repos/{self.full_name}/git/{ref}",
            "object": {"type": "commit", "sha": sha, "url": f"{self.api_url}/repos/{self.full_name}/git/commits/{sha}"},
        }

    # ---- the API -----------------------------------------------------------------------------

    def handle_api(self, method: str, raw_path: str, query: dict, body: dict | None, token: str | None) -> tuple[int, object]:
        parts = urlsplit(raw_path).path.split("/")
        # Path segments are matched percent-encoded: `heads%2Fmain` is one segment.
        segs = [p for p in parts if p != ""]
        if len(segs) < 3 or segs[0] != "repos":
            raise NotHandled()
        owner, repo, rest = segs[1], segs[2], segs[3:]
        if f"{owner}/{repo}".lower() != self.full_name.lower():
            raise ApiError(404, "Not Found")
        rest = [unquote(s) for s in rest]
        auth = self.tokens.get(token or "")
        if auth is None:
            raise ApiError(401, "Bad credentials")
        perms = auth["permissions"]

        def need(scope: str, level: str, *alts: str) -> None:
            order = {None: 0, "none": 0, READ: 1, WRITE: 2}
            for s in (scope, *alts):
                if order.get(perms.get(s)) >= order[level]:
                    return
            raise ApiError(403, "Resource not accessible by integration")

        with self.lock:
            if not rest and method == "GET":
                need("metadata", READ, "contents", "pull-requests", "issues")
                return 200, self._repo_json()
            head = rest[0]
            if head == "git":
                return self._git_api(method, rest[1:], body, need, auth)
            if head == "pulls":
                return self._pulls_api(method, rest[1:], query, body, need, auth)
            if head == "issues":
                return self._issues_api(method, rest[1:], query, body, need, auth)
        raise NotHandled()

    def _git_api(self, method, rest, body, need, auth):
        if method == "GET" and len(rest) >= 2 and rest[0] in ("ref", "refs"):
            need("contents", READ)
            ref = "refs/" + "/".join(rest[1:])
            sha = self.ref_sha(ref) if self._ref_exists(ref) else None
            if sha is None:
                raise ApiError(404, "Not Found")
            return 200, self._ref_json(ref, sha)
        if method == "GET" and len(rest) == 2 and rest[0] == "commits":
            need("contents", READ)
            sha = rest[1]
            if not re.fullmatch(r"[0-9a-f]{40}", sha) or self._type(sha) != "commit":
                raise ApiError(404, "Not Found")
            return 200, self._commit_json(sha)
        if method == "POST" and rest == ["blobs"]:
            need("contents", WRITE)
            content = _field(body, "content", str)
            encoding = (body or {}).get("encoding", "utf-8")
            if encoding == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except ValueError:
                    raise ApiError(422, "content is not valid Base64")
            elif encoding in ("utf-8", "utf8"):
                data = content.encode()
            else:
                raise ApiError(422, f"encoding {encoding!r} is not utf-8 or base64")
            sha = self.git("hash-object", "-w", "--stdin", input=data).strip()
            return 201, {"sha": sha, "url": f"{self.api_url}/repos/{self.full_name}/git/blobs/{sha}"}
        if method == "POST" and rest == ["trees"]:
            need("contents", WRITE)
            return 201, self._create_tree(body)
        if method == "POST" and rest == ["commits"]:
            need("contents", WRITE)
            tree = _field(body, "tree", str)
            message = _field(body, "message", str)
            parents = (body or {}).get("parents", [])
            if self._type(tree) != "tree":
                raise ApiError(422, "Tree SHA does not exist")
            for p in parents:
                if self._type(p) != "commit":
                    raise ApiError(422, "Parent SHA does not exist or is not a commit object")
            login = auth["login"]
            ident = {"GIT_AUTHOR_NAME": login, "GIT_AUTHOR_EMAIL": f"{login}@users.noreply.github.com", "GIT_COMMITTER_NAME": "GitHub", "GIT_COMMITTER_EMAIL": "noreply@github.com"}
            args = ["commit-tree", tree]
            for p in parents:
                args += ["-p", p]
            sha = self.git(*args, input=message.encode(), env=ident).strip()
            return 201, self._commit_json(sha)
        if method == "POST" and rest == ["refs"]:
            need("contents", WRITE)
            ref = _field(body, "ref", str)
            sha = _field(body, "sha", str)
            if not ref.startswith("refs/") or ref.count("/") < 2:
                raise ApiError(422, "Reference name must start with 'refs/' and have at least two slashes.")
            if self._ref_exists(ref):
                raise ApiError(422, "Reference already exists")
            if self._type(sha) != "commit":
                raise ApiError(422, "Object does not exist")
            self.git("update-ref", ref, sha, "")
            return 201, self._ref_json(ref, sha)
        if method == "PATCH" and len(rest) >= 2 and rest[0] == "refs":
            need("contents", WRITE)
            ref = "refs/" + "/".join(rest[1:])
            sha = _field(body, "sha", str)
            force = bool((body or {}).get("force", False))
            if not self._ref_exists(ref):
                raise ApiError(422, "Reference does not exist")
            if self._type(sha) != "commit":
                raise ApiError(422, "Object does not exist")
            old = self.ref_sha(ref)
            if not force and not self.is_ancestor(old, sha):
                raise ApiError(422, "Update is not a fast forward")
            self.git("update-ref", ref, sha, old)
            return 200, self._ref_json(ref, sha)
        raise NotHandled()

    def _ref_exists(self, ref: str) -> bool:
        r = subprocess.run(["git", "--git-dir", self.bare, "show-ref", "--verify", "-q", ref])
        return r.returncode == 0

    def _type(self, sha: str) -> str | None:
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
            return None
        r = subprocess.run(["git", "--git-dir", self.bare, "cat-file", "-t", sha], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    def _create_tree(self, body):
        entries = (body or {}).get("tree")
        if not isinstance(entries, list):
            raise ApiError(422, "Invalid request.\n\n\"tree\" wasn't supplied.")
        base = (body or {}).get("base_tree")
        index = os.path.join(self.root, f"index-api-{threading.get_ident()}")
        env = {"GIT_INDEX_FILE": index}
        if os.path.exists(index):
            os.remove(index)
        try:
            if base:
                if self._type(base) != "tree":
                    raise ApiError(422, "base_tree is not a valid tree oid")
                self.git("read-tree", base, env=env)
            else:
                self.git("read-tree", "--empty", env=env)
            for e in entries:
                path = e.get("path")
                mode = e.get("mode")
                typ = e.get("type")
                if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                    raise ApiError(422, f"tree.path {path!r} is invalid")
                if mode not in ("100644", "100755", "040000", "160000", "120000"):
                    raise ApiError(422, f"tree.mode {mode!r} is invalid")
                if typ not in ("blob", "tree", "commit"):
                    raise ApiError(422, f"tree.type {typ!r} is invalid")
                if "sha" in e and e["sha"] is None:
                    self.git("update-index", "--force-remove", path, env=env)
                    continue
                if "content" in e:
                    sha = self.git("hash-object", "-w", "--stdin", input=e["content"].encode()).strip()
                else:
                    sha = e.get("sha")
                    if self._type(sha) != typ:
                        raise ApiError(422, f"tree.sha {sha} is not a valid {typ}")
                if typ == "tree":
                    raise ApiError(422, "this harness does not graft whole trees; send blobs")
                self.git("update-index", "--add", "--cacheinfo", f"{mode},{sha},{path}", env=env)
            tree = self.git("write-tree", env=env).strip()
        finally:
            if os.path.exists(index):
                os.remove(index)
        listing = []
        for line in self.git("ls-tree", tree).splitlines():
            meta, path = line.split("\t", 1)
            mode, typ, sha = meta.split()
            listing.append({"path": path, "mode": mode, "type": typ, "sha": sha, "url": f"{self.api_url}/repos/{self.full_name}/git/{typ}s/{sha}"})
        return {"sha": tree, "url": f"{self.api_url}/repos/{self.full_name}/git/trees/{tree}", "tree": listing, "truncated": False}

    def _branch_json(self, branch: str, sha: str | None) -> dict:
        return {
            "label": f"{self.owner}:{branch}",
            "ref": branch,
            "sha": sha,
            "user": {"login": self.owner},
            "repo": self._repo_json(),
        }

    def _pulls_api(self, method, rest, query, body, need, auth):
        if method == "GET" and not rest:
            need("pull-requests", READ)
            state = _q(query, "state", "open")
            if state not in ("open", "closed", "all"):
                raise ApiError(422, f"state {state!r} is not open, closed or all")
            base = _q(query, "base")
            head = _q(query, "head")
            per_page = int(_q(query, "per_page", "30"))
            page = int(_q(query, "page", "1"))
            if not 1 <= per_page <= 100:
                per_page = 100 if per_page > 100 else 30
            rows = [p for p in self.pulls.values() if state == "all" or p["state"] == state]
            if base:
                rows = [p for p in rows if p["base"]["ref"] == base]
            if head:
                owner, _, branch = head.partition(":")
                rows = [p for p in rows if p["head"]["ref"] == branch and owner.lower() == self.owner.lower()]
            direction = _q(query, "direction", "desc")
            rows.sort(key=lambda p: p["number"], reverse=direction == "desc")
            chunk = rows[(page - 1) * per_page : page * per_page]
            return 200, [self._pull_json(p) for p in chunk]
        if method == "POST" and not rest:
            need("pull-requests", WRITE)
            title = _field(body, "title", str)
            head = _field(body, "head", str)
            base = _field(body, "base", str)
            branch = head.split(":", 1)[1] if ":" in head else head
            head_sha = self.ref_sha(f"refs/heads/{branch}") if self._ref_exists(f"refs/heads/{branch}") else None
            base_sha = self.ref_sha(f"refs/heads/{base}") if self._ref_exists(f"refs/heads/{base}") else None
            if head_sha is None:
                raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "head", "code": "invalid"}])
            if base_sha is None:
                raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "base", "code": "invalid"}])
            for p in self.pulls.values():
                if p["state"] == "open" and p["head"]["ref"] == branch and p["base"]["ref"] == base:
                    raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "code": "custom", "message": f"A pull request already exists for {self.owner}:{branch}."}])
            if self.is_ancestor(head_sha, base_sha):
                raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "code": "custom", "message": f"No commits between {base} and {branch}"}])
            n = self.next_number
            self.next_number += 1
            self.next_id += 1
            ts = now_iso()
            pr = {
                "url": f"{self.api_url}/repos/{self.full_name}/pulls/{n}",
                "id": self.next_id,
                "node_id": f"PR_{self.next_id}",
                "html_url": f"{self.server_url}/{self.full_name}/pull/{n}",
                "number": n,
                "state": "open",
                "locked": False,
                "title": title,
                "user": {"login": auth["login"], "type": "Bot"},
                "body": (body or {}).get("body"),
                "labels": [],
                "created_at": ts,
                "updated_at": ts,
                "closed_at": None,
                "merged_at": None,
                "merge_commit_sha": None,
                "merged": False,
                "draft": bool((body or {}).get("draft", False)),
                "maintainer_can_modify": bool((body or {}).get("maintainer_can_modify", False)),
                "requested_reviewers": [],
                "requested_teams": [],
                "head": self._branch_json(branch, head_sha),
                "base": self._branch_json(base, base_sha),
                "author_association": "NONE",
            }
            self.pulls[n] = pr
            self.comments[n] = []
            return 201, self._pull_json(pr)
        if rest and rest[0].isdigit():
            n = int(rest[0])
            pr = self.pulls.get(n)
            if pr is None:
                raise ApiError(404, "Not Found")
            if method == "GET" and len(rest) == 1:
                need("pull-requests", READ)
                return 200, self._pull_json(pr)
            if method == "PATCH" and len(rest) == 1:
                need("pull-requests", WRITE)
                b = body or {}
                for key in b:
                    if key not in ("title", "body", "state", "base", "maintainer_can_modify"):
                        raise ApiError(422, f"this harness does not update `{key}` of a pull request")
                if "state" in b:
                    if b["state"] not in ("open", "closed"):
                        raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "state", "code": "invalid"}])
                    if pr["merged_at"] and b["state"] == "open":
                        raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "code": "custom", "message": "state cannot be changed. The pull request has been merged."}])
                    pr["state"] = b["state"]
                    pr["closed_at"] = now_iso() if b["state"] == "closed" else None
                for key in ("title", "body", "maintainer_can_modify"):
                    if key in b:
                        pr[key] = b[key]
                if "base" in b:
                    pr["base"] = self._branch_json(b["base"], self.ref_sha(f"refs/heads/{b['base']}"))
                pr["updated_at"] = now_iso()
                return 200, self._pull_json(pr)
            if method == "POST" and rest[1:] == ["requested_reviewers"]:
                need("pull-requests", WRITE)
                b = body or {}
                users = b.get("reviewers", []) or []
                teams = b.get("team_reviewers", []) or []
                if not users and not teams:
                    raise ApiError(422, "Invalid request.\n\nNo subschema in \"anyOf\" matched.")
                if pr["user"]["login"] in users:
                    raise ApiError(422, "Review cannot be requested from pull request author.")
                pr["requested_reviewers"] += [{"login": u, "type": "User"} for u in users]
                pr["requested_teams"] += [{"slug": t, "name": t} for t in teams]
                return 201, self._pull_json(pr)
        raise NotHandled()

    def _issues_api(self, method, rest, query, body, need, auth):
        if not rest or not rest[0].isdigit():
            raise NotHandled()
        n = int(rest[0])
        pr = self.pulls.get(n)
        if pr is None:
            raise ApiError(404, "Not Found")
        if method == "POST" and rest[1:] == ["labels"]:
            need("issues", WRITE, "pull-requests")
            labels = (body or {}).get("labels")
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise ApiError(422, "Invalid request.\n\nFor 'properties/labels', it is not an array of strings.")
            names = [l["name"] for l in pr["labels"]]
            for label in labels:
                if label not in names:
                    pr["labels"].append({"id": len(names) + 1, "name": label, "color": "ededed", "default": False})
                    names.append(label)
            return 200, pr["labels"]
        if rest[1:] == ["comments"]:
            if method == "POST":
                need("issues", WRITE, "pull-requests")
                text = _field(body, "body", str)
                self.next_id += 1
                ts = now_iso()
                comment = {
                    "id": self.next_id,
                    "node_id": f"IC_{self.next_id}",
                    "url": f"{self.api_url}/repos/{self.full_name}/issues/comments/{self.next_id}",
                    "html_url": f"{pr['html_url']}#issuecomment-{self.next_id}",
                    "body": text,
                    "user": {"login": auth["login"], "type": "Bot"},
                    "created_at": ts,
                    "updated_at": ts,
                }
                self.comments[n].append(comment)
                return 201, comment
            if method == "GET":
                need("issues", READ, "pull-requests")
                per_page = int(_q(query, "per_page", "30"))
                page = int(_q(query, "page", "1"))
                rows = self.comments[n]
                return 200, rows[(page - 1) * per_page : page * per_page]
        raise NotHandled()

    # ---- HTTP ----------------------------------------------------------------------------------

    def start(self) -> None:
        gh = self

        class Api(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload, headers: dict | None = None):
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-RateLimit-Limit", "5000")
                self.send_header("X-RateLimit-Remaining", "4999")
                self.send_header("X-RateLimit-Reset", str(int(time.time()) + 3600))
                self.send_header("X-GitHub-Api-Version-Selected", "2022-11-28")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                auth = self.headers.get("Authorization") or ""
                token = None
                for prefix in ("Bearer ", "bearer ", "token ", "Token "):
                    if auth.startswith(prefix):
                        token = auth[len(prefix) :].strip()
                split = urlsplit(self.path)
                query = parse_qs(split.query, keep_blank_values=True)
                entry = {"method": method, "path": self.path, "status": None}
                try:
                    body = json.loads(raw) if raw else None
                    if raw and not isinstance(body, dict):
                        raise ApiError(400, "Problems parsing JSON")
                    entry["body"] = body
                    status, payload = gh.handle_api(method, self.path, query, body, token)
                except json.JSONDecodeError:
                    status, payload = 400, {"message": "Problems parsing JSON"}
                except ApiError as e:
                    status = e.status
                    payload = {"message": e.message, "documentation_url": "https://docs.github.com/rest", "status": str(e.status)}
                    if e.errors:
                        payload["errors"] = e.errors
                except NotHandled:
                    status, payload = 404, {"message": "Not Found (not implemented by the harness)", "documentation_url": "https://docs.github.com/rest"}
                    with gh.lock:
                        gh.unhandled.append({"method": method, "path": self.path})
                except GitError as e:
                    status, payload = 500, {"message": f"harness git failure: {e}"}
                entry["status"] = status
                with gh.lock:
                    gh.requests.append(entry)
                self._send(status, payload)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PATCH(self):
                self._handle("PATCH")

            def do_PUT(self):
                self._handle("PUT")

            def do_DELETE(self):
                self._handle("DELETE")

        class Web(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _bytes(self, status: int, data: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def do_GET(self):
                path = unquote(urlsplit(self.path).path)
                m = re.fullmatch(r"/([^/]+/[^/]+)/releases/download/([^/]+)/([^/]+)", path)
                if m:
                    repo, tag, asset = m.groups()
                    file = os.path.join(gh.releases_dir, repo, tag, asset)
                    if not os.path.isfile(file):
                        return self._bytes(404, b"Not Found")
                    # GitHub redirects asset downloads to its object store.
                    return self._bytes(302, b"", {"Location": f"{gh.server_url}/_objects/{repo}/{tag}/{asset}"})
                m = re.fullmatch(r"/_objects/([^/]+/[^/]+)/([^/]+)/([^/]+)", path)
                if m:
                    repo, tag, asset = m.groups()
                    tampered = gh.tampered.get((repo, tag, asset))
                    if tampered is not None:
                        return self._bytes(200, tampered, {"Content-Type": "application/octet-stream"})
                    file = os.path.join(gh.releases_dir, repo, tag, asset)
                    if os.path.isfile(file):
                        with open(file, "rb") as f:
                            return self._bytes(200, f.read(), {"Content-Type": "application/octet-stream"})
                self._bytes(404, b"Not Found")

            do_HEAD = do_GET

        for handler, attr in ((Api, "api_url"), (Web, "server_url")):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            setattr(self, attr, f"http://127.0.0.1:{server.server_address[1]}")
            self._servers.append(server)

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        self._servers.clear()


class NotHandled(Exception):
    pass


def _q(query: dict, name: str, default: str | None = None) -> str | None:
    values = query.get(name)
    return values[-1] if values else default


def _field(body: dict | None, name: str, typ: type):
    value = (body or {}).get(name)
    if not isinstance(value, typ):
        raise ApiError(422, f"Invalid request.\n\n\"{name}\" wasn't supplied.")
    return value
