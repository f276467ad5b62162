"""The actions the harness emulates instead of downloading: actions/checkout (v4),
actions/cache, actions/cache/restore, actions/cache/save (v4) and actions/upload-artifact,
actions/download-artifact (v4). Each accepts only the inputs it emulates; any other input is an
error that names it, so a workflow never silently relies on behaviour the harness lacks.

Behaviour kept from the real actions (their READMEs and sources):
- checkout: a fresh fetch of the event's commit from the repository (depth 1 by default), on a
  local branch named after the ref; outputs `ref` and `commit`.
- cache: keys are looked up as given, then each restore-key in order; each key first exactly, then
  as a prefix, newest entry first; entries are scoped to the branch (and the default branch's are
  visible to all); the version is the path list, so other paths never match. `actions/cache` saves
  in a post step, only when the job succeeded and the primary key did not hit exactly. An existing
  key is never overwritten (a warning, as "Unable to reserve cache"). Paths that do not exist are
  not saved (a warning).
- upload-artifact: glob patterns with `!` excludes, hidden files and directories skipped unless
  `include-hidden-files: true`, the least common ancestor of the search paths as the root,
  `if-no-files-found`, `retention-days` 1..90, one artifact per name per run unless `overwrite`.
- download-artifact: by name into `path`, or all (or `pattern`) into `path/<name>/` unless
  `merge-multiple`; artifacts are scoped to the workflow run.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import threading

from .engine import HarnessError, StepFailure


def _check_inputs(action: str, given: dict, known: set, where: str) -> None:
    for k in given:
        if k not in known:
            raise HarnessError(f"{where}: input `{k}` of {action} is not emulated by this harness (emulated: {sorted(known)})")


def _truth(v: str | None, default: bool) -> bool:
    if v is None or v == "":
        return default
    if v.lower() not in ("true", "false"):
        raise StepFailure(f"Input does not meet YAML 1.2 \"Core Schema\" specification: {v}")
    return v.lower() == "true"


def _lines(v: str | None) -> list[str]:
    return [x.strip() for x in (v or "").splitlines() if x.strip()]


# ---- checkout ----------------------------------------------------------------------------------


def checkout(job, w: dict, env: dict, where: str, sid: str):
    _check_inputs("actions/checkout", w, {"repository", "ref", "token", "persist-credentials", "path", "fetch-depth", "clean", "lfs", "submodules", "fetch-tags", "show-progress", "set-safe-directory"}, where)
    gh = job.h.github
    repo = w.get("repository") or gh.full_name
    if repo.lower() != gh.full_name.lower():
        raise HarnessError(f"{where}: checkout of another repository ({repo}) is not emulated")
    for flag in ("lfs", "submodules"):
        if _truth(w.get(flag), False):
            raise HarnessError(f"{where}: checkout `{flag}: true` is not emulated")
    dest = os.path.join(job.workspace, w.get("path") or "")
    dest = os.path.normpath(dest)
    if not dest.startswith(job.workspace):
        raise StepFailure(f"Repository path '{dest}' is not under '{job.workspace}'")
    ref = w.get("ref") or ""
    if not ref:
        sha, branch = job.rx.run.sha, job.rx.run.ref.removeprefix("refs/heads/")
    elif len(ref) == 40 and all(c in "0123456789abcdef" for c in ref):
        sha, branch = ref, None
    else:
        branch = ref.removeprefix("refs/heads/")
        sha = gh.ref_sha(f"refs/heads/{branch}")
        if sha is None:
            raise StepFailure(f"A branch or tag with the name '{ref}' could not be found")
    depth = int(w.get("fetch-depth") or 1)
    if os.path.isdir(dest):
        for name in os.listdir(dest):
            p = os.path.join(dest, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    os.makedirs(dest, exist_ok=True)

    def g(*args):
        r = subprocess.run(["git", *args], cwd=dest, capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HOME": job.home, "GIT_CONFIG_NOSYSTEM": "1"})
        for line in (r.stdout + r.stderr).splitlines():
            job.logline(line)
        if r.returncode != 0:
            raise StepFailure(f"git {' '.join(args)} failed with exit code {r.returncode}")

    g("init", "-q")
    g("remote", "add", "origin", f"file://{gh.bare}")
    target = f"refs/remotes/origin/{branch}" if branch else "refs/remotes/origin/_checkout"
    fetch = ["-c", "protocol.version=2", "fetch", "--no-tags", "--prune", "--no-recurse-submodules"]
    if depth > 0:
        fetch.append(f"--depth={depth}")
    g(*fetch, "origin", f"+{sha}:{target}")
    if branch:
        g("checkout", "-q", "--force", "-B", branch, target)
    else:
        g("checkout", "-q", "--force", "--detach", sha)
    if not _truth(w.get("persist-credentials"), True):
        pass  # no credentials are ever written: the fetch used a file:// URL
    return True, {"ref": ref or job.rx.run.ref, "commit": sha}


# ---- cache -------------------------------------------------------------------------------------


class CacheStore:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.index_path = os.path.join(root, "index.json")
        self.lock = threading.Lock()
        self.seq = 0
        if not os.path.exists(self.index_path):
            self._write([])

    def _read(self) -> list:
        with open(self.index_path) as f:
            return json.load(f)

    def _write(self, entries: list) -> None:
        with open(self.index_path, "w") as f:
            json.dump(entries, f, indent=1)

    def entries(self) -> list:
        return self._read()

    @staticmethod
    def version(paths: list[str]) -> str:
        return hashlib.sha256(("|".join(paths) + "|gzip").encode()).hexdigest()

    def lookup(self, keys: list[str], version: str, scopes: list[str]) -> dict | None:
        entries = [e for e in self._read() if e["version"] == version]
        for scope in scopes:
            scoped = [e for e in entries if e["scope"] == scope]
            for key in keys:
                exact = [e for e in scoped if e["key"] == key]
                if exact:
                    return exact[0]
                prefixed = sorted((e for e in scoped if e["key"].startswith(key)), key=lambda e: e["seq"], reverse=True)
                if prefixed:
                    return prefixed[0]
        return None

    def exists(self, key: str, version: str, scope: str) -> bool:
        return any(e["key"] == key and e["version"] == version and e["scope"] == scope for e in self._read())

    def save(self, key: str, version: str, scope: str, archive: str, run_id: int, job: str) -> bool:
        with self.lock:
            entries = self._read()
            if any(e["key"] == key and e["version"] == version and e["scope"] == scope for e in entries):
                return False
            seq = max([e["seq"] for e in entries], default=0) + 1
            dest = os.path.join(self.root, f"{seq:05d}.tar.gz")
            shutil.move(archive, dest)
            entries.append({"key": key, "version": version, "scope": scope, "seq": seq, "file": dest, "size": os.path.getsize(dest), "run_id": run_id, "job": job})
            self._write(entries)
            return True


def _cache_paths(job, paths: list[str]) -> list[tuple[str, str]]:
    """(absolute path, name in the archive) for every existing match of the path patterns."""
    out = []
    for p in paths:
        if p.startswith("!"):
            raise HarnessError(f"cache path exclusions (`{p}`) are not emulated")
        # `~` is the runner user's home, not this machine's.
        full = job.home + p[1:] if p.startswith("~") else p
        full = os.path.normpath(os.path.join(job.workspace, full))
        for m in sorted(glob.glob(full, recursive=True)) if glob.has_magic(full) else ([full] if os.path.exists(full) else []):
            rel = os.path.relpath(m, job.workspace)
            out.append((m, rel))
    return out


def _scope(job) -> list[str]:
    ref = job.rx.run.ref
    default = f"refs/heads/{job.h.github.default_branch}"
    return [ref] if ref == default else [ref, default]


def _restore(job, w: dict, where: str, action: str):
    key = w.get("key") or ""
    if not key:
        raise StepFailure("Input required and not supplied: key")
    if len(key) > 512 or "," in key:
        raise StepFailure(f"Key Validation Error: {key} cannot contain commas or exceed 512 characters.")
    paths = _lines(w.get("path"))
    if not paths:
        raise StepFailure("Input required and not supplied: path")
    restore_keys = _lines(w.get("restore-keys"))
    version = CacheStore.version(paths)
    entry = job.h.cache.lookup([key, *restore_keys], version, _scope(job))
    outputs = {"cache-primary-key": key}
    if entry is None:
        if _truth(w.get("fail-on-cache-miss"), False):
            raise StepFailure(f"Failed to restore cache entry. Exiting as fail-on-cache-miss is set. Input key: {key}")
        job.logline(f"Cache not found for input keys: {', '.join([key, *restore_keys])}")
        outputs["cache-hit"] = "false"
        return None, outputs
    exact = entry["key"] == key
    outputs["cache-matched-key"] = entry["key"]
    outputs["cache-hit"] = "true" if exact else "false"
    if not _truth(w.get("lookup-only"), False):
        with tarfile.open(entry["file"]) as tar:
            for m in tar.getmembers():
                if m.name.startswith("__abs__/"):
                    m.name = m.name[len("__abs__") :]
                    tar.extract(m, "/", filter="tar")
                else:
                    tar.extract(m, job.workspace, filter="tar")
        job.logline(f"Cache restored from key: {entry['key']}")
    return entry, outputs


def _save(job, key: str, paths: list[str], where: str) -> None:
    version = CacheStore.version(paths)
    files = _cache_paths(job, paths)
    if not files:
        job.annotate("warning", "Path Validation Error: Path(s) specified in the action for caching do(es) not exist, hence no cache is being saved.")
        return
    scope = job.rx.run.ref
    if job.h.cache.exists(key, version, scope):
        job.annotate("warning", f"Failed to save: Unable to reserve cache with key {key}, another job may be creating this cache.")
        return
    archive = os.path.join(job.temp, f"cache-{os.getpid()}-{len(job.res.log)}.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for full, rel in files:
            name = rel if not rel.startswith("..") else "__abs__" + full
            tar.add(full, arcname=name)
    if job.h.cache.save(key, version, scope, archive, job.rx.run.id, job.jid):
        job.logline(f"Cache saved with key: {key}")
    else:
        job.annotate("warning", f"Failed to save: Unable to reserve cache with key {key}, another job may be creating this cache.")


CACHE_INPUTS = {"path", "key", "restore-keys", "upload-chunk-size", "enableCrossOsArchive", "fail-on-cache-miss", "lookup-only", "save-always"}


def cache(job, w: dict, env: dict, where: str, sid: str):
    _check_inputs("actions/cache", w, CACHE_INPUTS, where)
    if _truth(w.get("save-always"), False):
        raise HarnessError(f"{where}: actions/cache `save-always` is not emulated (deprecated upstream)")
    entry, outputs = _restore(job, w, where, "actions/cache")
    key = w["key"]
    paths = _lines(w.get("path"))
    hit = outputs.get("cache-hit") == "true"

    def post():
        # post-if: success(); and never when the primary key hit exactly.
        if job.failed:
            job.logline(f"Post cache: not saving {key}: the job failed")
            return
        if hit:
            job.logline(f"Cache hit occurred on the primary key {key}, not saving cache.")
            return
        _save(job, key, paths, where)

    job.post_steps.append(post)
    return True, outputs


def cache_restore(job, w: dict, env: dict, where: str, sid: str):
    _check_inputs("actions/cache/restore", w, {"path", "key", "restore-keys", "enableCrossOsArchive", "fail-on-cache-miss", "lookup-only"}, where)
    _, outputs = _restore(job, w, where, "actions/cache/restore")
    return True, outputs


def cache_save(job, w: dict, env: dict, where: str, sid: str):
    _check_inputs("actions/cache/save", w, {"path", "key", "upload-chunk-size", "enableCrossOsArchive"}, where)
    key = w.get("key") or ""
    paths = _lines(w.get("path"))
    if not key or not paths:
        raise StepFailure("Input required and not supplied: key/path")
    _save(job, key, paths, where)
    return True, {}


# ---- artifacts ---------------------------------------------------------------------------------


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.uploads: list[dict] = []

    def dir(self, run_id: int, name: str) -> str:
        return os.path.join(self.root, str(run_id), name)

    def list(self, run_id: int) -> list[str]:
        d = os.path.join(self.root, str(run_id))
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def meta(self, run_id: int, name: str) -> dict:
        with open(self.dir(run_id, name) + ".json") as f:
            return json.load(f)


_MAGIC = set("*?[")


def _search_root(pattern: str) -> str:
    parts = pattern.split("/")
    keep = []
    for p in parts:
        if any(c in _MAGIC for c in p):
            break
        keep.append(p)
    return "/".join(keep) or "/"


def _walk(root: str, skip_hidden: bool):
    """Files under root (or root itself), skipping hidden items from root's own name down."""
    if skip_hidden and os.path.basename(root.rstrip("/")).startswith("."):
        return
    if os.path.isfile(root):
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        if skip_hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if skip_hidden and f.startswith("."):
                continue
            yield os.path.join(dirpath, f)


def _lca(paths: list[str]) -> str:
    return os.path.commonpath(paths)


def upload_artifact(job, w: dict, env: dict, where: str, sid: str):
    _check_inputs("actions/upload-artifact", w, {"name", "path", "if-no-files-found", "retention-days", "compression-level", "overwrite", "include-hidden-files"}, where)
    name = w.get("name") or "artifact"
    patterns = _lines(w.get("path"))
    if not patterns:
        raise StepFailure("Input required and not supplied: path")
    include_hidden = _truth(w.get("include-hidden-files"), False)
    overwrite = _truth(w.get("overwrite"), False)
    if_none = w.get("if-no-files-found") or "warn"
    if if_none not in ("warn", "error", "ignore"):
        raise StepFailure(f"Unrecognized if-no-files-found input. Provided: {if_none}. Available options: warn, error, ignore")
    retention = w.get("retention-days") or "90"
    try:
        retention_days = int(retention)
    except ValueError:
        raise StepFailure(f"Invalid retention, input must be a number: {retention}")
    if not 1 <= retention_days <= 90:
        raise StepFailure(f"Retention days must be between 1 and 90 (got {retention_days})")
    includes = [p for p in patterns if not p.startswith("!")]
    excludes = [os.path.normpath(os.path.join(job.workspace, p[1:])) for p in patterns if p.startswith("!")]
    files: set[str] = set()
    search_paths: list[str] = []
    for p in includes:
        full = os.path.normpath(os.path.join(job.workspace, p))
        root = _search_root(full)
        if root not in search_paths:
            search_paths.append(root)
        matches = glob.glob(full, recursive=True, include_hidden=True) if glob.has_magic(full) else ([full] if os.path.exists(full) else [])
        for m in matches:
            # Hidden items are judged from the search root's own name down (as @actions/glob).
            rel = os.path.relpath(m, root)
            parts = [os.path.basename(root)] + ([] if rel == "." else rel.split(os.sep))
            if not include_hidden and any(x.startswith(".") and x not in (".", "..") for x in parts):
                continue
            for f in _walk(m, not include_hidden):
                files.add(f)
    files = {f for f in files if not any(fnmatch.fnmatch(f, ex) or f.startswith(ex + os.sep) for ex in excludes)}
    if not files:
        msg = f"No files were found with the provided path: {chr(10).join(patterns)}. No artifacts will be uploaded."
        if if_none == "error":
            raise StepFailure(msg)
        if if_none == "warn":
            job.annotate("warning", msg)
        else:
            job.logline(msg)
        return True, {}
    files_sorted = sorted(files)
    if len(search_paths) > 1:
        root = _lca(search_paths)
    elif len(files_sorted) == 1 and files_sorted[0] == search_paths[0]:
        root = os.path.dirname(files_sorted[0])
    else:
        root = search_paths[0]
    store = job.h.artifacts
    dest = store.dir(job.rx.run.id, name)
    if os.path.exists(dest):
        if not overwrite:
            raise StepFailure(f"Failed to CreateArtifact: Received non-retryable error: Failed request: (409) Conflict: an artifact with this name already exists on the workflow run")
        shutil.rmtree(dest)
    os.makedirs(dest)
    listing = []
    for f in files_sorted:
        rel = os.path.relpath(f, root)
        if rel.startswith(".."):
            raise StepFailure(f"{f} is outside the artifact root {root}")
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(f, os.path.join(dest, rel))
        listing.append(rel)
    meta = {"name": name, "run_id": job.rx.run.id, "job": job.jid, "retention_days": retention_days, "files": listing, "size": sum(os.path.getsize(f) for f in files_sorted)}
    with open(dest + ".json", "w") as fh:
        json.dump(meta, fh, indent=1)
    store.uploads.append(meta)
    job.logline(f"Artifact {name} uploaded: {len(listing)} file(s) from {os.path.relpath(root, job.workspace)}, retention {retention_days} day(s)")
    aid = str(len(store.uploads))
    return True, {"artifact-id": aid, "artifact-url": f"{job.h.github.server_url}/{job.h.github.full_name}/actions/runs/{job.rx.run.id}/artifacts/{aid}", "artifact-digest": ""}


def download_artifact(job, w: dict, env: dict, where: str, sid: str):
    _check_inputs("actions/download-artifact", w, {"name", "path", "pattern", "merge-multiple", "github-token", "repository", "run-id"}, where)
    for k in ("github-token", "repository", "run-id"):
        if w.get(k):
            raise HarnessError(f"{where}: downloading another run's artifacts (`{k}`) is not emulated")
    store = job.h.artifacts
    run_id = job.rx.run.id
    dest = os.path.normpath(os.path.join(job.workspace, os.path.expanduser(w.get("path") or ".")))
    name = w.get("name")
    if name:
        src = store.dir(run_id, name)
        if not os.path.isdir(src):
            raise StepFailure(f"Unable to download artifact(s): Artifact not found for name: {name}\n        Please ensure that your artifact is not expired and the artifact was uploaded using a compatible version of toolkit/upload-artifact.")
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return True, {"download-path": dest}
    names = store.list(run_id)
    names = [n for n in names if not n.endswith(".json")]
    if w.get("pattern"):
        names = [n for n in names if fnmatch.fnmatch(n, w["pattern"])]
    merge = _truth(w.get("merge-multiple"), False)
    for n in names:
        shutil.copytree(store.dir(run_id, n), dest if merge else os.path.join(dest, n), dirs_exist_ok=True)
    return True, {"download-path": dest}


# ---- GitHub Pages --------------------------------------------------------------------------------


def upload_pages_artifact(job, w: dict, env: dict, where: str, sid: str):
    """actions/upload-pages-artifact: the site directory as the run's `github-pages` artifact
    (the real action tars it first; the harness keeps the files, which is what deploy reads)."""
    _check_inputs("actions/upload-pages-artifact", w, {"path", "name", "retention-days"}, where)
    path = w.get("path") or "_site/"
    full = os.path.normpath(os.path.join(job.workspace, path))
    if not os.path.isdir(full):
        raise StepFailure(f"tar: {path}: Cannot open: No such file or directory")
    for f in _walk(full, False):
        if os.path.islink(f):
            raise StepFailure(f"Pages artifacts may not hold symbolic links: {os.path.relpath(f, full)}")
    return upload_artifact(job, {"name": w.get("name") or "github-pages", "path": full, "retention-days": w.get("retention-days") or "1", "include-hidden-files": "true"}, env, where, sid)


def deploy_pages(job, w: dict, env: dict, where: str, sid: str):
    """actions/deploy-pages: publishes this run's `github-pages` artifact as the repository's
    site. Like GitHub it needs `pages: write` and `id-token: write` on the job's token."""
    _check_inputs("actions/deploy-pages", w, {"token", "timeout", "error_count", "reporting_interval", "artifact_name", "preview"}, where)
    perms = job.res.token_permissions
    if perms.get("pages") != "write" or perms.get("id-token") != "write":
        raise StepFailure(f"Ensure GITHUB_TOKEN has permission \"id-token: write\" and \"pages: write\" (the job has {perms})")
    name = w.get("artifact_name") or "github-pages"
    src = job.h.artifacts.dir(job.rx.run.id, name)
    if not os.path.isdir(src):
        raise StepFailure(f"Fetching artifact metadata failed. Is a Pages artifact named {name} uploaded in this run?")
    site = os.path.join(job.h.root, "pages")
    if os.path.exists(site):
        shutil.rmtree(site)
    shutil.copytree(src, site)
    job.h.pages_deployments.append({"run_id": job.rx.run.id, "job": job.jid, "files": sorted(os.listdir(site))})
    url = f"https://{job.h.github.owner}.github.io/{job.h.github.name}/"
    job.logline(f"Reported success! Site at {url}")
    return True, {"page_url": url}


BUILTINS = {
    "actions/upload-pages-artifact": upload_pages_artifact,
    "actions/deploy-pages": deploy_pages,
    "actions/checkout": checkout,
    "actions/cache": cache,
    "actions/cache/restore": cache_restore,
    "actions/cache/save": cache_save,
    "actions/upload-artifact": upload_artifact,
    "actions/download-artifact": download_artifact,
}
