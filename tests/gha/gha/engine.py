"""The workflow engine: runs a workflow file the way GitHub's runner does, on this machine.

One `Harness` holds the simulated world: the repository (`github.GitHub`, a bare git repo with
its REST API), the Actions cache, the artifact store, secrets and variables. `Harness.trigger`
reads the workflow file from the repository at the event's commit (as GitHub does), checks the
event against its `on:` filters, and runs its jobs in `needs` order, each on a fresh runner
directory. Emulated actions live in `actions.py`; anything the engine does not emulate
(matrix, containers, services, reusable workflows, an action neither emulated nor mapped to a
local directory) stops the run with an error that names it.
"""

from __future__ import annotations

import json
import os
import re
import secrets as pysecrets
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import expr
from .expr import ExprError, Scope
from .github import GitHub


class HarnessError(Exception):
    """A workflow the harness cannot run as GitHub would (names the place and the reason)."""


# ---------------------------------------------------------------------------------------------
# YAML as GitHub reads it: `on`, `yes`, `no` stay strings, dates stay strings.


class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise HarnessError(f"{where}: not valid YAML: {e}") from None


# ---------------------------------------------------------------------------------------------
# Filter patterns (branches, paths): GitHub's cheat sheet syntax.


def _filter_regex(pattern: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append(".")
        elif c == "+":
            out.append("+")
        elif c == "[":
            j = pattern.index("]", i)
            out.append(pattern[i : j + 1])
            i = j + 1
            continue
        elif c == "\\":
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


def filter_matches(patterns: list[str], value: str) -> bool:
    """Ordered include/`!`exclude patterns: the last pattern that matches decides."""
    result = False
    for p in patterns:
        neg = p.startswith("!")
        body = p[1:] if neg else p
        if _filter_regex(body).match(value):
            result = not neg
    return result


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class StepResult:
    id: str
    name: str
    outcome: str = "skipped"
    conclusion: str = "skipped"
    outputs: dict = field(default_factory=dict)


@dataclass
class JobRun:
    id: str
    result: str = "skipped"
    outputs: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    annotations: list = field(default_factory=list)
    summary: str = ""
    runner_dir: str = ""
    workspace: str = ""
    temp: str = ""
    log: list = field(default_factory=list)
    runs_on: Any = None
    token_permissions: dict = field(default_factory=dict)
    # `environment:` of the job: its name, and its url evaluated at the end of the job.
    environment: dict = field(default_factory=dict)

    def step(self, name_or_id: str) -> StepResult:
        for s in self.steps:
            if s.id == name_or_id or s.name == name_or_id:
                return s
        raise KeyError(f"job {self.id} has no step {name_or_id!r}: {[s.name for s in self.steps]}")

    def errors(self) -> list[str]:
        return [a["message"] for a in self.annotations if a["level"] == "error"]

    def log_text(self) -> str:
        return "\n".join(self.log)


@dataclass
class WorkflowRun:
    id: int
    number: int
    attempt: int
    event: str
    sha: str
    ref: str
    workflow: str
    jobs: dict = field(default_factory=dict)

    @property
    def conclusion(self) -> str:
        results = [j.result for j in self.jobs.values()]
        if any(r == "failure" for r in results):
            return "failure"
        return "success"

    def job(self, job_id: str) -> JobRun:
        return self.jobs[job_id]


# ---------------------------------------------------------------------------------------------


def _permissions(raw: Any, where: str) -> dict:
    scopes = ["actions", "attestations", "checks", "contents", "deployments", "id-token", "issues", "metadata", "packages", "pages", "pull-requests", "repository-projects", "security-events", "statuses"]
    if raw is None:
        return None
    if raw == "read-all":
        return {s: "read" for s in scopes}
    if raw == "write-all":
        return {s: "write" for s in scopes}
    if isinstance(raw, dict):
        out = {}
        for k, v in raw.items():
            if k not in scopes or v not in ("read", "write", "none"):
                raise HarnessError(f"{where}: permissions `{k}: {v}` is not valid")
            out[k] = v
        if out:
            out.setdefault("metadata", "read")
        return out
    raise HarnessError(f"{where}: permissions {raw!r} is not valid")


# GitHub's "restricted" default for GITHUB_TOKEN when a workflow names no permissions.
DEFAULT_PERMISSIONS = {"contents": "read", "metadata": "read", "packages": "read"}


def _parse_file_commands(path: str, what: str) -> dict:
    """`name=value` lines and `name<<DELIM` heredocs (GITHUB_OUTPUT, GITHUB_ENV)."""
    out: dict[str, str] = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\r")
        i += 1
        if line == "":
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            body = []
            while True:
                if i >= len(lines):
                    raise HarnessError(f"{what}: matching delimiter not found '{delim}'")
                cur = lines[i].rstrip("\r")
                i += 1
                if cur == delim:
                    break
                body.append(cur)
            out[name] = "\n".join(body)
        elif "=" in line:
            name, value = line.split("=", 1)
            if not name:
                raise HarnessError(f"{what}: invalid format '{line}' (empty name)")
            out[name] = value
        else:
            raise HarnessError(f"{what}: invalid format '{line}'")
    return out


_CMD = re.compile(r"^::([A-Za-z-]+)(?:\s+([^:]*))?::(.*)$")


def _unescape_data(s: str) -> str:
    return s.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def _unescape_prop(s: str) -> str:
    return s.replace("%0D", "\r").replace("%0A", "\n").replace("%3A", ":").replace("%2C", ",").replace("%25", "%")


# Files above this size are removed from a finished job's runner directory.
PRUNE_BYTES = 16 * 1024 * 1024


class Harness:
    """The simulated GitHub side: repository, cache, artifacts, secrets, variables."""

    def __init__(
        self,
        root: str,
        github: GitHub,
        *,
        secrets: dict | None = None,
        vars: dict | None = None,
        action_map: dict | None = None,
        runner_env: dict | None = None,
        verbose: bool = False,
    ):
        self.root = os.path.abspath(root)
        self.github = github
        self.secrets = dict(secrets or {})
        self.vars = dict(vars or {})
        # "owner/repo/path" (no @ref) -> local directory holding action.yml
        self.action_map = dict(action_map or {})
        # Extra variables every step's process sees, like a runner's own environment (e.g. a
        # simulated clock); never secrets.
        self.runner_env = dict(runner_env or {})
        self.verbose = verbose
        self.run_counter = 0
        self.runs: list[WorkflowRun] = []
        from .actions import ArtifactStore, CacheStore

        self.cache = CacheStore(os.path.join(self.root, "actions-cache"))
        self.artifacts = ArtifactStore(os.path.join(self.root, "artifacts"))
        # What actions/deploy-pages published (the site itself is under <root>/pages).
        self.pages_deployments: list[dict] = []
        git_cfg = os.path.join(self.github.bare, "config")
        subprocess.run(["git", "config", "--file", git_cfg, "uploadpack.allowAnySHA1InWant", "true"], check=True)

    def say(self, text: str) -> None:
        print(f"[gha] {text}", file=sys.stderr, flush=True)

    # ---- events ------------------------------------------------------------------------------

    def _workflow_at(self, sha: str, path: str) -> dict:
        text = self.github.read_file(sha, path)
        if text is None:
            raise HarnessError(f"{path} does not exist at {sha[:12]} of {self.github.full_name}")
        wf = load_yaml(text.decode(), path)
        if not isinstance(wf, dict) or "jobs" not in wf or "on" not in wf:
            raise HarnessError(f"{path}: a workflow needs `on:` and `jobs:`")
        return wf

    @staticmethod
    def _triggers(wf: dict) -> dict:
        on = wf["on"]
        if isinstance(on, str):
            return {on: {}}
        if isinstance(on, list):
            return {e: {} for e in on}
        return {k: (v or {}) for k, v in on.items()}

    def trigger(
        self,
        event: str,
        workflow_path: str = ".github/workflows/rlhf.yml",
        *,
        inputs: dict | None = None,
        push: dict | None = None,
        ref: str | None = None,
        runner_env: dict | None = None,
    ) -> WorkflowRun | None:
        """Fires `event`; returns the run, or None when the workflow's `on:` does not match (as
        GitHub starts no run). `push` is {ref, before, after} (from `GitHub.merge_pull`)."""
        gh = self.github
        if event == "push":
            if push is None:
                raise HarnessError("a push event needs {ref, before, after}")
            ref = push["ref"]
            sha = push["after"]
        else:
            ref = ref or f"refs/heads/{gh.default_branch}"
            sha = gh.ref_sha(ref)
            if sha is None:
                raise HarnessError(f"{ref} does not exist in {gh.full_name}")
        wf = self._workflow_at(sha, workflow_path)
        triggers = self._triggers(wf)
        if event not in triggers:
            self.say(f"{workflow_path}: `on:` has no {event}; no run")
            return None
        spec = triggers[event] if isinstance(triggers[event], dict) else {}
        payload: dict = {"repository": gh._repo_json(), "sender": {"login": "alice"}}
        typed_inputs: dict = {}
        if event == "schedule":
            crons = triggers[event]
            if not isinstance(crons, list) or not crons:
                raise HarnessError(f"{workflow_path}: `on.schedule` needs a list of crons")
            if ref != f"refs/heads/{gh.default_branch}":
                raise HarnessError("scheduled runs use the default branch only")
            payload["schedule"] = crons[0]["cron"]
        elif event == "workflow_dispatch":
            typed_inputs = self._dispatch_inputs(spec.get("inputs") or {}, inputs or {}, workflow_path)
            payload["inputs"] = {k: expr.to_string(v) for k, v in typed_inputs.items()}
            payload["ref"] = ref
        elif event == "push":
            branch = ref.removeprefix("refs/heads/")
            if "branches" in spec and not filter_matches(spec["branches"], branch):
                self.say(f"push to {branch}: not in `branches`; no run")
                return None
            if "branches-ignore" in spec and filter_matches(spec["branches-ignore"], branch):
                return None
            changed = gh.changed_files(push.get("before"), sha)
            if "paths" in spec and not any(filter_matches(spec["paths"], p) for p in changed):
                self.say(f"push to {branch}: no changed file matches `paths` {spec['paths']} (changed: {changed}); no run")
                return None
            if "paths-ignore" in spec and all(filter_matches(spec["paths-ignore"], p) for p in changed):
                return None
            payload.update(
                ref=ref,
                before=push.get("before") or "0" * 40,
                after=sha,
                head_commit={"id": sha, "message": gh.git("log", "-1", "--format=%B", sha)},
                commits=[{"id": sha}],
                pusher={"name": "alice"},
            )
        else:
            raise HarnessError(f"event `{event}` is not emulated (schedule, workflow_dispatch, push are)")
        if inputs and event != "workflow_dispatch":
            raise HarnessError("inputs are for workflow_dispatch only")
        self.run_counter += 1
        run = WorkflowRun(
            id=1000 + self.run_counter,
            number=self.run_counter,
            attempt=1,
            event=event,
            sha=sha,
            ref=ref,
            workflow=wf.get("name") or workflow_path,
        )
        self.runs.append(run)
        self.say(f"run {run.id} ({event} on {ref} at {sha[:10]}): workflow {run.workflow!r}")
        RunExecutor(self, wf, workflow_path, run, payload, typed_inputs, dict(self.runner_env, **(runner_env or {}))).execute()
        self.say(f"run {run.id}: {run.conclusion} ({', '.join(f'{j}={r.result}' for j, r in run.jobs.items())})")
        return run

    @staticmethod
    def _dispatch_inputs(spec: dict, given: dict, where: str) -> dict:
        out = {}
        for name in given:
            if name not in spec:
                raise HarnessError(f"{where}: unexpected workflow_dispatch input `{name}` (declared: {list(spec)})")
        for name, d in spec.items():
            d = d or {}
            typ = d.get("type", "string")
            if name in given:
                v = given[name]
            elif "default" in d:
                v = d["default"]
            elif d.get("required"):
                raise HarnessError(f"{where}: input `{name}` is required")
            else:
                v = False if typ == "boolean" else ""
            if typ == "boolean":
                if isinstance(v, str):
                    if v not in ("true", "false"):
                        raise HarnessError(f"input `{name}`: {v!r} is not a boolean")
                    v = v == "true"
                v = bool(v)
            elif typ == "choice":
                v = expr.to_string(v)
                if v not in [expr.to_string(o) for o in d.get("options", [])]:
                    raise HarnessError(f"input `{name}`: {v!r} is not one of {d.get('options')}")
            elif typ == "number":
                v = float(v)
            elif typ in ("string", "environment"):
                v = expr.to_string(v)
            else:
                raise HarnessError(f"input `{name}`: type {typ!r} is not emulated")
            out[name] = v
        return out


class RunExecutor:
    def __init__(self, h: Harness, wf: dict, path: str, run: WorkflowRun, payload: dict, inputs: dict, runner_env: dict):
        self.h = h
        self.wf = wf
        self.path = path
        self.run = run
        self.payload = payload
        self.inputs = inputs
        self.runner_env = runner_env
        for key in wf:
            if key not in ("name", "run-name", "on", "permissions", "env", "defaults", "concurrency", "jobs"):
                raise HarnessError(f"{path}: top-level key `{key}` is not emulated")

    def github_ctx(self, job_id: str | None = None, token: str = "", workspace: str = "", event_path: str = "") -> dict:
        gh = self.h.github
        run = self.run
        return {
            "event_name": run.event,
            "event": self.payload,
            "event_path": event_path,
            "sha": run.sha,
            "ref": run.ref,
            "ref_name": run.ref.split("/", 2)[-1],
            "ref_type": "branch",
            "ref_protected": False,
            "base_ref": "",
            "head_ref": "",
            "repository": gh.full_name,
            "repository_owner": gh.owner,
            "repositoryUrl": f"git://{gh.full_name}.git",
            "run_id": str(run.id),
            "run_number": str(run.number),
            "run_attempt": str(run.attempt),
            "retention_days": "90",
            "workflow": run.workflow,
            "workflow_ref": f"{gh.full_name}/{self.path}@{run.ref}",
            "workflow_sha": run.sha,
            "job": job_id or "",
            "actor": "alice",
            "triggering_actor": "alice",
            "server_url": gh.server_url,
            "api_url": gh.api_url,
            "graphql_url": gh.api_url + "/graphql",
            "token": token,
            "workspace": workspace,
            "action": "",
            "action_path": "",
        }

    def execute(self) -> None:
        jobs = self.wf["jobs"]
        if not isinstance(jobs, dict) or not jobs:
            raise HarnessError(f"{self.path}: `jobs` is empty")
        needs = {}
        for jid, job in jobs.items():
            n = job.get("needs", [])
            n = [n] if isinstance(n, str) else list(n)
            for d in n:
                if d not in jobs:
                    raise HarnessError(f"{self.path}: job `{jid}` needs unknown job `{d}`")
            needs[jid] = n
        done: list[str] = []
        while len(done) < len(jobs):
            ready = [j for j in jobs if j not in done and all(d in done for d in needs[j])]
            if not ready:
                raise HarnessError(f"{self.path}: `needs` has a cycle among {[j for j in jobs if j not in done]}")
            jid = ready[0]
            self.run.jobs[jid] = self.run_job(jid, jobs[jid], needs)
            done.append(jid)

    def ancestors(self, jid: str, needs: dict) -> set:
        out = set()
        stack = list(needs[jid])
        while stack:
            j = stack.pop()
            if j not in out:
                out.add(j)
                stack.extend(needs[j])
        return out

    def run_job(self, jid: str, job: dict, needs: dict) -> JobRun:
        where = f"{self.path}: jobs.{jid}"
        result = JobRun(id=jid)
        for key in job:
            if key in ("strategy", "container", "services", "uses", "secrets", "with"):
                raise HarnessError(f"{where}.{key} is not emulated by this harness")
            if key not in ("name", "needs", "if", "runs-on", "timeout-minutes", "permissions", "outputs", "env", "defaults", "steps", "continue-on-error", "concurrency", "environment"):
                raise HarnessError(f"{where}: key `{key}` is not emulated")
        needs_ctx = {d: {"result": self.run.jobs[d].result, "outputs": dict(self.run.jobs[d].outputs)} for d in needs[jid]}
        anc = [self.run.jobs[a].result for a in self.ancestors(jid, needs)]

        def job_status(fn: str) -> bool:
            if fn == "always":
                return True
            if fn == "cancelled":
                return False
            if fn == "failure":
                return any(r == "failure" for r in anc)
            return all(r == "success" for r in anc)

        base_ctx = {
            "github": self.github_ctx(jid),
            "needs": needs_ctx,
            "vars": dict(self.h.vars),
            "inputs": dict(self.inputs),
        }
        try:
            run_it = expr.condition(job.get("if"), Scope(base_ctx, status=job_status, where=f"{where}.if"))
        except ExprError as e:
            raise HarnessError(f"{where}.if: {e}") from None
        if not run_it:
            self.h.say(f"  job {jid}: skipped (if: {job.get('if', 'success()')})")
            result.result = "skipped"
            return result
        return JobExecutor(self, jid, job, needs_ctx, result).execute()


class JobExecutor:
    def __init__(self, rx: RunExecutor, jid: str, job: dict, needs_ctx: dict, result: JobRun):
        self.rx = rx
        self.h = rx.h
        self.jid = jid
        self.job = job
        self.needs_ctx = needs_ctx
        self.res = result
        self.where = f"{rx.path}: jobs.{jid}"
        self.masks: list[str] = []
        self.failed = False
        self.post_steps: list = []
        self.extra_path: list[str] = []
        self.env_file_vars: dict[str, str] = {}

    # ---- contexts ----------------------------------------------------------------------------

    def contexts(self, env: dict, steps_ctx: dict, inputs: dict | None = None, action_path: str = "") -> dict:
        g = dict(self.github)
        g["action_path"] = action_path
        if action_path:
            # Inside a composite action GitHub offers no secrets, vars or needs: a composite
            # action gets what it needs through its inputs.
            return {
                "github": g,
                "inputs": inputs or {},
                "env": dict(env),
                "steps": steps_ctx,
                "job": {"status": "failure" if self.failed else "success"},
                "runner": self.runner_ctx,
                "strategy": {},
                "matrix": {},
            }
        return {
            "github": g,
            "needs": self.needs_ctx,
            "vars": dict(self.h.vars),
            "secrets": self.secrets_ctx,
            "inputs": dict(self.rx.inputs) if inputs is None else inputs,
            "env": dict(env),
            "steps": steps_ctx,
            "job": {"status": "failure" if self.failed else "success"},
            "runner": self.runner_ctx,
            "strategy": {},
            "matrix": {},
        }

    def scope(self, ctx: dict, where: str, status: bool = False) -> Scope:
        def st(fn: str) -> bool:
            if fn == "always":
                return True
            if fn == "cancelled":
                return False
            if fn == "failure":
                return self.failed
            return not self.failed

        return Scope(ctx, status=st if status else None, hash_files=self.hash_files, where=where)

    def ev(self, value: Any, ctx: dict, where: str) -> Any:
        try:
            return expr.interpolate(value, self.scope(ctx, where))
        except ExprError as e:
            raise HarnessError(f"{where}: {e}") from None

    def ev_str(self, value: Any, ctx: dict, where: str) -> str:
        v = self.ev(value, ctx, where)
        if isinstance(v, (dict, list)):
            raise HarnessError(f"{where}: the expression gives an object or array where text is needed")
        return expr.to_string(v) if v is not None else ""

    def hash_files(self, patterns: list[str]) -> str:
        import glob
        import hashlib

        files = set()
        for p in patterns:
            for f in glob.glob(os.path.join(self.workspace, p), recursive=True):
                if os.path.isfile(f):
                    files.add(f)
        if not files:
            return ""
        total = hashlib.sha256()
        for f in sorted(files):
            with open(f, "rb") as fh:
                total.update(hashlib.sha256(fh.read()).digest())
        return total.hexdigest()

    def mask(self, text: str) -> str:
        for m in sorted(self.masks, key=len, reverse=True):
            if m:
                text = text.replace(m, "***")
        return text

    def logline(self, text: str) -> None:
        line = self.mask(text)
        self.res.log.append(line)
        if self.h.verbose:
            print(f"    {self.jid} | {line}", file=sys.stderr, flush=True)

    # ---- the job -----------------------------------------------------------------------------

    def execute(self) -> JobRun:
        rx, h, job = self.rx, self.h, self.job
        run = rx.run
        self.dir = os.path.join(h.root, "runners", f"{run.id}-{run.attempt}-{self.jid}")
        if os.path.exists(self.dir):
            shutil.rmtree(self.dir)
        repo_name = h.github.name
        self.workspace = os.path.join(self.dir, "work", repo_name, repo_name)
        self.temp = os.path.join(self.dir, "temp")
        self.home = os.path.join(self.dir, "home")
        self.tool_cache = os.path.join(self.dir, "tool_cache")
        self.cmd_dir = os.path.join(self.temp, "_runner_file_commands")
        for d in (self.workspace, self.temp, self.home, self.tool_cache, self.cmd_dir):
            os.makedirs(d)
        self.res.runner_dir, self.res.workspace, self.res.temp = self.dir, self.workspace, self.temp
        event_path = os.path.join(self.dir, "event.json")
        with open(event_path, "w") as f:
            json.dump(rx.payload, f)

        perms = _permissions(job.get("permissions"), f"{self.where}.permissions")
        if perms is None:
            perms = _permissions(rx.wf.get("permissions"), f"{rx.path}: permissions")
        if perms is None:
            perms = dict(DEFAULT_PERMISSIONS)
        self.res.token_permissions = perms
        self.token = "ghs_" + pysecrets.token_hex(18)
        h.github.add_token(self.token, perms)
        self.masks.append(self.token)
        self.masks.extend(v for v in h.secrets.values() if v)
        self.secrets_ctx = dict(h.secrets, GITHUB_TOKEN=self.token)
        self.github = rx.github_ctx(self.jid, self.token, self.workspace, event_path)
        self.runner_ctx = {"os": "Linux", "arch": "X64", "name": f"harness-{self.jid}", "temp": self.temp, "tool_cache": self.tool_cache, "environment": "github-hosted", "debug": ""}

        base = {
            "github": self.github,
            "needs": self.needs_ctx,
            "vars": dict(h.vars),
            "secrets": self.secrets_ctx,
            "inputs": dict(rx.inputs),
        }
        try:
            self.res.runs_on = expr.interpolate(job.get("runs-on"), Scope(dict(base, strategy={}, matrix={}), where=f"{self.where}.runs-on"))
        except ExprError as e:
            raise HarnessError(f"{self.where}.runs-on: {e}") from None
        # Workflow env sees github, secrets, inputs, vars; job env also needs, strategy, matrix.
        wf_env = {}
        for k, v in (rx.wf.get("env") or {}).items():
            wf_env[k] = self.ev_str(v, dict(base, env={}), f"{rx.path}: env.{k}")
        job_env = {}
        for k, v in (job.get("env") or {}).items():
            job_env[k] = self.ev_str(v, dict(base, env=dict(wf_env), strategy={}, matrix={}), f"{self.where}.env.{k}")
        self.global_env = dict(wf_env, **job_env)
        self.defaults = dict(((rx.wf.get("defaults") or {}).get("run") or {}), **((job.get("defaults") or {}).get("run") or {}))

        timeout = float(job.get("timeout-minutes", 360)) * 60
        self.deadline = time.monotonic() + timeout
        h.say(f"  job {self.jid}: runs-on {self.res.runs_on!r}, token permissions {perms}")
        steps_ctx: dict = {}
        try:
            for i, step in enumerate(job.get("steps") or []):
                self.run_step(step, i, steps_ctx, self.res.steps, top=True)
            for post in reversed(self.post_steps):
                post()
        finally:
            h.github.revoke_token(self.token)
        self.res.result = "failure" if self.failed else "success"
        self.prune()
        with open(os.path.join(self.dir, "log.txt"), "w") as f:
            f.write(self.res.log_text() + "\n")
        # The deployment environment: GitHub evaluates its url once the steps ran.
        env_spec = job.get("environment")
        if env_spec is not None:
            spec = env_spec if isinstance(env_spec, dict) else {"name": env_spec}
            unknown = set(spec) - {"name", "url", "deployment"}
            if unknown or not spec.get("name"):
                raise HarnessError(f"{self.where}.environment: needs a name; unknown keys {sorted(unknown)}")
            ctx = self.contexts(self.global_env, steps_ctx)
            self.res.environment = {
                "name": self.ev_str(spec["name"], ctx, f"{self.where}.environment.name"),
                "url": self.ev_str(spec.get("url", ""), ctx, f"{self.where}.environment.url"),
            }
        # Job outputs: evaluated at the end; a value holding a secret is dropped, as GitHub does.
        for name, raw in (job.get("outputs") or {}).items():
            value = self.ev_str(raw, self.contexts(self.global_env, steps_ctx), f"{self.where}.outputs.{name}")
            if any(m and m in value for m in self.masks):
                self.annotate("warning", f"Skip output '{name}' since it may contain secret.")
                continue
            self.res.outputs[name] = value
        h.say(f"  job {self.jid}: {self.res.result}" + (f" outputs {self.res.outputs}" if self.res.outputs else ""))
        return self.res

    def prune(self) -> None:
        """The runner directory stays for inspection, without its large files (installed
        binaries, model weights): a GitHub runner is thrown away, this disk is not."""
        for dirpath, _, filenames in os.walk(self.dir):
            for f in filenames:
                p = os.path.join(dirpath, f)
                if not os.path.islink(p) and os.path.getsize(p) > PRUNE_BYTES:
                    os.remove(p)

    def annotate(self, level: str, message: str, props: dict | None = None) -> None:
        self.res.annotations.append({"level": level, "message": self.mask(message), "properties": props or {}})
        self.logline(f"##[{level}]{message}")

    # ---- steps -------------------------------------------------------------------------------

    def step_env(self, step: dict, ctx_env: dict, steps_ctx: dict, inputs: dict | None, action_path: str, where: str, outer_env: dict | None = None) -> dict:
        env = dict(self.global_env)
        env.update(self.env_file_vars)
        if outer_env:
            env.update(outer_env)
        own = {}
        for k, v in (step.get("env") or {}).items():
            own[k] = self.ev_str(v, self.contexts(env, steps_ctx, inputs, action_path), f"{where}.env.{k}")
        env.update(own)
        return env

    def run_step(self, step: dict, index: int, steps_ctx: dict, records: list, top: bool, inputs: dict | None = None, action_path: str = "", outer_env: dict | None = None, where_prefix: str | None = None) -> None:
        where = f"{where_prefix or self.where}.steps[{index}]"
        for key in step:
            if key not in ("id", "name", "if", "uses", "run", "with", "env", "shell", "working-directory", "continue-on-error", "timeout-minutes"):
                raise HarnessError(f"{where}: key `{key}` is not emulated")
        sid = step.get("id") or f"__{index}"
        if "uses" in step and "run" in step or ("uses" not in step and "run" not in step):
            raise HarnessError(f"{where}: a step has exactly one of `uses` and `run`")
        env_for_if = dict(self.global_env, **self.env_file_vars, **(outer_env or {}))
        ctx = self.contexts(env_for_if, steps_ctx, inputs, action_path)
        name = step.get("name")
        name = self.ev_str(name, ctx, f"{where}.name") if name else (f"Run {step['uses']}" if "uses" in step else f"Run {str(step['run']).strip().splitlines()[0] if str(step['run']).strip() else ''}")
        rec = StepResult(id=sid, name=name)
        records.append(rec)
        try:
            go = expr.condition(step.get("if"), self.scope(ctx, f"{where}.if", status=True))
        except ExprError as e:
            raise HarnessError(f"{where}.if: {e}") from None
        if not go:
            self.logline(f"-- {name}: skipped")
            steps_ctx[sid] = {"outputs": {}, "outcome": "skipped", "conclusion": "skipped"}
            return
        self.logline(f"-- {name}")
        env = self.step_env(step, ctx["env"], steps_ctx, inputs, action_path, where, outer_env)
        ctx = self.contexts(env, steps_ctx, inputs, action_path)
        coe = step.get("continue-on-error", False)
        if isinstance(coe, str):
            coe = expr.truthy(self.ev(coe, ctx, f"{where}.continue-on-error"))
        ok = True
        outputs: dict = {}
        try:
            if "run" in step:
                ok, outputs = self.exec_run(step, env, ctx, where, sid, action_path, in_composite=not top)
            else:
                ok, outputs = self.exec_uses(step, env, ctx, where, sid)
        except StepFailure as e:
            self.annotate("error", str(e))
            ok = False
        rec.outcome = "success" if ok else "failure"
        rec.conclusion = "success" if ok or coe else "failure"
        rec.outputs = outputs
        steps_ctx[sid] = {"outputs": dict(outputs), "outcome": rec.outcome, "conclusion": rec.conclusion}
        if rec.conclusion == "failure":
            self.failed = True

    def _shell(self, step: dict, action_path: str, in_composite: bool, where: str) -> list[str]:
        shell = step.get("shell")
        if shell is None and in_composite:
            raise HarnessError(f"{where}: a composite action's run step needs `shell` (GitHub refuses it without)")
        if shell is None:
            shell = self.defaults.get("shell")
        if shell is None or shell == "bash":
            return ["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"]
        if shell == "sh":
            return ["sh", "-e", "{0}"]
        if shell == "python":
            return ["python3", "{0}"]
        if "{0}" in shell:
            return shell.split()
        raise HarnessError(f"{where}: shell `{shell}` is not emulated (bash, sh, python, or a command with {{0}})")

    def _file_commands(self) -> dict:
        tag = uuid.uuid4().hex
        files = {}
        for name in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY", "GITHUB_STATE"):
            p = os.path.join(self.cmd_dir, f"{name.lower()}_{tag}")
            open(p, "w").close()
            files[name] = p
        return files

    def process_env(self, env: dict, files: dict, sid: str, action_path: str) -> dict:
        g = self.github
        pe = {
            "PATH": os.pathsep.join(list(reversed(self.extra_path)) + [os.environ.get("PATH", "/usr/bin:/bin")]),
            "HOME": self.home,
            "LANG": "C.UTF-8",
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_ACTION": sid,
            "GITHUB_ACTOR": g["actor"],
            "GITHUB_TRIGGERING_ACTOR": g["triggering_actor"],
            "GITHUB_API_URL": g["api_url"],
            "GITHUB_GRAPHQL_URL": g["graphql_url"],
            "GITHUB_SERVER_URL": g["server_url"],
            "GITHUB_BASE_REF": "",
            "GITHUB_HEAD_REF": "",
            "GITHUB_EVENT_NAME": g["event_name"],
            "GITHUB_EVENT_PATH": g["event_path"],
            "GITHUB_JOB": self.jid,
            "GITHUB_REF": g["ref"],
            "GITHUB_REF_NAME": g["ref_name"],
            "GITHUB_REF_TYPE": "branch",
            "GITHUB_REPOSITORY": g["repository"],
            "GITHUB_REPOSITORY_OWNER": g["repository_owner"],
            "GITHUB_RETENTION_DAYS": "90",
            "GITHUB_RUN_ATTEMPT": g["run_attempt"],
            "GITHUB_RUN_ID": g["run_id"],
            "GITHUB_RUN_NUMBER": g["run_number"],
            "GITHUB_SHA": g["sha"],
            "GITHUB_WORKFLOW": g["workflow"],
            "GITHUB_WORKFLOW_REF": g["workflow_ref"],
            "GITHUB_WORKSPACE": self.workspace,
            "RUNNER_ARCH": "X64",
            "RUNNER_OS": "Linux",
            "RUNNER_NAME": self.runner_ctx["name"],
            "RUNNER_TEMP": self.temp,
            "RUNNER_TOOL_CACHE": self.tool_cache,
            "RUNNER_ENVIRONMENT": "github-hosted",
        }
        if action_path:
            pe["GITHUB_ACTION_PATH"] = action_path
        pe.update(files)
        pe.update(self.rx.runner_env)
        for k, v in env.items():
            if k.startswith("GITHUB_") and k in pe and k != "GITHUB_TOKEN":
                continue  # GitHub does not let a workflow override its own variables
            pe[k] = v
        return pe

    def exec_run(self, step: dict, env: dict, ctx: dict, where: str, sid: str, action_path: str, in_composite: bool) -> tuple[bool, dict]:
        script = self.ev_str(step["run"], ctx, f"{where}.run")
        shell = self._shell(step, action_path, in_composite, where)
        wd = step.get("working-directory") or (None if in_composite else self.defaults.get("working-directory"))
        cwd = self.workspace
        if wd:
            wd = self.ev_str(wd, ctx, f"{where}.working-directory")
            cwd = os.path.join(self.workspace, wd)
        ext = ".py" if shell[0].startswith("python") else ".sh"
        path = os.path.join(self.temp, f"{uuid.uuid4()}{ext}")
        with open(path, "w") as f:
            f.write(script)
        files = self._file_commands()
        argv = [a.replace("{0}", path) for a in shell]
        pe = self.process_env(env, files, sid, action_path)
        step_timeout = step.get("timeout-minutes")
        remaining = self.deadline - time.monotonic()
        limit = min(remaining, float(step_timeout) * 60) if step_timeout else remaining
        if limit <= 0:
            raise StepFailure("The job has exceeded the maximum execution time")
        proc = subprocess.Popen(argv, cwd=cwd, env=pe, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        stop_token = None
        assert proc.stdout is not None
        timed_out = False
        import threading

        def killer():
            nonlocal timed_out
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if stop_token is not None:
                if line == f"::{stop_token}::":
                    stop_token = None
                self.logline(line)
                continue
            m = _CMD.match(line)
            if m:
                stop_token = self.workflow_command(m, stop_token)
                continue
            self.logline(line)
        proc.stdout.close()
        proc.wait()
        t.join()
        if timed_out:
            raise StepFailure(f"The step timed out after {limit / 60:.1f} minutes")
        outputs = self.after_step(files)
        if proc.returncode != 0:
            self.annotate("error", f"Process completed with exit code {proc.returncode}.")
            return False, outputs
        return True, outputs

    def workflow_command(self, m: re.Match, stop_token):
        cmd, props_raw, data = m.group(1), m.group(2) or "", m.group(3)
        props = {}
        for part in filter(None, props_raw.split(",")):
            k, _, v = part.partition("=")
            props[k.strip()] = _unescape_prop(v)
        data = _unescape_data(data)
        if cmd in ("error", "warning", "notice"):
            self.annotate(cmd, data, props)
        elif cmd == "add-mask":
            if data:
                self.masks.append(data)
        elif cmd in ("group", "endgroup", "debug", "echo"):
            self.logline(f"##[{cmd}]{data}")
        elif cmd == "stop-commands":
            return data
        elif cmd in ("set-output", "save-state", "set-env", "add-path"):
            raise StepFailure(f"the `{cmd}` workflow command is deprecated or disabled on GitHub; use the GITHUB_* files")
        else:
            self.logline(m.group(0))
        return None

    def after_step(self, files: dict) -> dict:
        outputs = _parse_file_commands(files["GITHUB_OUTPUT"], "GITHUB_OUTPUT")
        for k, v in _parse_file_commands(files["GITHUB_ENV"], "GITHUB_ENV").items():
            if k in ("NODE_OPTIONS",):
                raise StepFailure(f"GITHUB_ENV may not set {k}")
            self.env_file_vars[k] = v
        with open(files["GITHUB_PATH"]) as f:
            for line in f:
                line = line.strip()
                if line:
                    self.extra_path.append(line)
        with open(files["GITHUB_STEP_SUMMARY"]) as f:
            text = f.read()
        if text:
            self.res.summary += self.mask(text)
        return outputs

    def exec_uses(self, step: dict, env: dict, ctx: dict, where: str, sid: str) -> tuple[bool, dict]:
        from . import actions

        uses = step["uses"]
        with_raw = step.get("with") or {}
        with_vals = {k: self.ev(v, ctx, f"{where}.with.{k}") for k, v in with_raw.items()}
        with_vals = {k: (expr.to_string(v) if not isinstance(v, str) else v) for k, v in with_vals.items()}
        if uses.startswith("./"):
            return self.composite(os.path.join(self.workspace, uses[2:]), uses, with_vals, env, where, sid)
        if uses.startswith("docker://"):
            raise HarnessError(f"{where}: docker actions are not emulated ({uses})")
        name, at, ref = uses.partition("@")
        if not at:
            raise HarnessError(f"{where}: `{uses}` has no @ref")
        builtin = actions.BUILTINS.get(name)
        if builtin is not None:
            return builtin(self, with_vals, env, where, sid)
        if name in self.h.action_map:
            return self.composite(self.h.action_map[name], uses, with_vals, env, where, sid)
        raise HarnessError(f"{where}: action `{uses}` is neither emulated ({', '.join(sorted(actions.BUILTINS))}) nor mapped to a local directory (--action-map)")

    def composite(self, directory: str, uses: str, with_vals: dict, env: dict, where: str, sid: str) -> tuple[bool, dict]:
        for fname in ("action.yml", "action.yaml"):
            path = os.path.join(directory, fname)
            if os.path.isfile(path):
                break
        else:
            raise HarnessError(f"{where}: `{uses}` has no action.yml in {directory}")
        with open(path) as f:
            action = load_yaml(f.read(), path)
        runs = action.get("runs") or {}
        if runs.get("using") != "composite":
            raise HarnessError(f"{where}: `{uses}` uses `{runs.get('using')}`; only composite actions run here")
        declared = action.get("inputs") or {}
        for k in with_vals:
            if k not in declared:
                self.annotate("warning", f"Unexpected input(s) '{k}', valid inputs are {list(declared)}")
        # Defaults may use github.* (e.g. `${{ github.token }}`), evaluated in the caller's job.
        inputs = {}
        dctx = self.contexts(env, {}, {}, "")
        for k, d in declared.items():
            if k in with_vals:
                inputs[k] = with_vals[k]
            else:
                default = (d or {}).get("default", "")
                inputs[k] = self.ev_str(default, dctx, f"{path}: inputs.{k}.default")
        action_dir = os.path.dirname(os.path.abspath(path))
        inner_ctx: dict = {}
        before = self.failed
        self.failed = False
        for i, st in enumerate(runs.get("steps") or []):
            self.run_step(st, i, inner_ctx, [], top=False, inputs=inputs, action_path=action_dir, outer_env=env, where_prefix=f"{path}: runs")
        ok = not self.failed
        self.failed = before
        outputs = {}
        octx = self.contexts(env, inner_ctx, inputs, action_dir)
        for k, d in (action.get("outputs") or {}).items():
            outputs[k] = self.ev_str((d or {}).get("value", ""), octx, f"{path}: outputs.{k}")
        return ok, outputs


class StepFailure(Exception):
    """A step failed the way GitHub reports it (an error annotation, the step fails)."""
