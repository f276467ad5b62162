#!/usr/bin/env python3
"""The promise, end to end: the shipped workflow template, run the way GitHub runs it, over
several simulated days against a loopback GitHub and feedback API (docs/workflow-harness.md).

    python3 tests/gha/scenario_rlhf.py --binary target/debug/rlhf-bot [--work DIR] [-v]

Day 0  a tampered release tarball: the install step refuses it; nothing else runs.
Day 1  schedule: 598 records arrive -> exactly one PR with the report and the registry change.
Day 2  schedule, nothing new: no training job, no commit, no PR closed; the check job saves state.
Merge  the PR is merged (push event): the post-merge job runs; `registry show` on main and the
       next check (day 3) name the merged candidate as production; `rlhf-bot deploy` publishes
       both models under the shared artifact store's production/ prefix (manifest, complete
       record) and a loopback webhook receives the signed notice.
Day 4  new feedback -> a new PR; it is closed without merging.
Day 5  schedule: the same model is not proposed again; then a forced dry run from the Actions tab
       (workflow_dispatch inputs) keeps its PR as an artifact and opens none.
Day 6  the feedback API is down: the check job fails fast with one error annotation.

Every expectation is checked and reported (the scenario goes on after a failed one); the exit
status is 1 when any failed. Expectations marked PENDING-BOT depend on bot changes being merged
separately (the PR's registry diff moving `production`, `rlhf-bot registry show`, recording a
closed PR as a rejection, one annotation for an unreachable API); until then they fail, and say so.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.server
import json
import os
import threading
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gha.world import CPU_ASSET, BOT_REPO, RELEASE_TAG, World, project_root  # noqa: E402


def simulated_days(sample_max: datetime) -> dict[int, str]:
    """The scheduled runs' clock (RLHF_BOT_NOW), one day apart at 05:17 UTC. They start after both
    the newest sample record and the real clock: the bot stamps registry entries with the real
    time, and a registry entry from the simulated future would look like a training to come."""
    start = max(datetime.now(timezone.utc), sample_max) + timedelta(days=1)
    start = start.replace(hour=5, minute=17, second=0, microsecond=0)
    days = {n: start + timedelta(days=n - 1) for n in range(1, 7)}
    days[0] = start - timedelta(hours=1)
    return {n: d.strftime("%Y-%m-%dT%H:%M:%SZ") for n, d in days.items()}


DAY: dict[int, str] = {}
WORKFLOW = ".github/workflows/rlhf.yml"


WEBHOOK_SECRET = "whsec-scenario-3f9a"


class WebhookReceiver:
    """The serving side of `rlhf-bot deploy`: a loopback HTTP server that checks each delivery's
    X-Rlhf-Bot-Signature the way docs/serving.md tells a receiver to."""

    def __init__(self):
        self.deliveries: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(expected, self.headers.get("X-Rlhf-Bot-Signature", ""))
                receiver.deliveries.append({"ok": ok, "body": body, "key": self.headers.get("Idempotency-Key")})
                self.send_response(200 if ok else 401)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def team_config(feedback_url: str, api_url: str, artifacts: str, webhook_url: str) -> str:
    # The tiny from-scratch models (configs/example.yaml's shape) with very few steps: the
    # scenario is about the workflow, not the models.
    return f"""\
feedback:
  source: http
  url: {feedback_url}
  page_size: 200
  max_attempts: 2
  timeout_secs: 10
  aspects: [accuracy, helpfulness]
store:
  dir: .rlhf
thresholds:
  min_new_feedback: 50
  min_new_signals: 20
  max_age_days: 7
  min_hours_between: 6
  quality:
    enabled: true
    window_days: 7
    confidence: 0.95
    min_samples: 30
reward:
  epochs: 1
  max_length: 96
  batch_size: 8
registry:
  path: models/registry.yaml
  # One store every job reaches (a bucket in real life; here a directory on the machine that
  # runs every simulated runner), so the post-merge job can deploy what the train job stored.
  artifacts: {artifacts}
report:
  dir: reports
publish:
  mode: github
  labels: [rlhf-bot]
  reviewers: [octocat]
  github:
    api_url: {api_url}
    repo: acme/assistant
    base_branch: main
policy:
  enabled: true
  algo: dpo
  steps: 2
  lr: 0.005
  batch_size: 2
  max_prompt_length: 48
  max_completion_length: 8
  eval_prompts: 4
  # merge: the stored policy carries its merged weights, so the post-merge job exports `hf` and
  # GGUF without the from-scratch base, which lives only in the train job's run directory.
  lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj], merge: true}}
deploy:
  formats: {{policy: [hf, gguf-q8_0], reward: [hf]}}
  webhook:
    url: {webhook_url}
"""


def _parse(value) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def new_records(day: int, count: int, sample: list[dict]) -> list[dict]:
    """`count` fresh records on `day`, shaped like the sample's valid thumbs and ratings."""
    usable = [r for r in sample if r.get("kind") in ("thumb", "rating") and isinstance(r.get("prompt"), list)]
    out = []
    base = DAY[day][:10]
    for i in range(count):
        src = dict(usable[i % len(usable)])
        src["id"] = f"fb_d{day}_{i:04d}"
        src["conversation_id"] = f"c_d{day}_{i // 3:03d}"
        src["message_id"] = f"m_d{day}_{i:04d}"
        ts = f"{base}T0{i // 60 % 5}:{i % 60:02d}:00Z"  # before the day's 05:17 run
        src["created_at"] = src["updated_at"] = ts
        out.append(src)
    return out


class Checks:
    def __init__(self):
        self.results: list[tuple[bool, str, str | None]] = []

    def expect(self, ok: bool, what: str, pending: str | None = None, detail: str = "") -> bool:
        self.results.append((bool(ok), what, pending))
        tag = "ok  " if ok else ("FAIL" if not pending else "FAIL PENDING-BOT")
        extra = f" [{pending}]" if pending and not ok else ""
        print(f"[scenario] {tag} {what}{extra}" + (f"\n           {detail}" if detail and not ok else ""), file=sys.stderr, flush=True)
        return bool(ok)

    def report(self) -> int:
        failed = [r for r in self.results if not r[0]]
        print(f"\n[scenario] {len(self.results) - len(failed)}/{len(self.results)} expectations met", file=sys.stderr)
        for ok, what, pending in failed:
            why = f"  (PENDING-BOT: {pending})" if pending else ""
            print(f"[scenario]   failed: {what}{why}", file=sys.stderr)
        return 1 if failed else 0


def failure_detail(run) -> str:
    """The results, and the end of each failed job's log."""
    out = [str({j: r.result for j, r in run.jobs.items()})]
    for jid, job in run.jobs.items():
        if job.result == "failure":
            out.append(f"--- {jid} (log: {job.runner_dir}/log.txt)")
            out += job.log[-25:]
    return "\n           ".join(out)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def stored_sha256(store: str, uri: str, path: str) -> str | None:
    """sha256 of a file a manifest lists, by its `file://…/production/…` URI under `store`."""
    rel = uri.split("/production/", 1)[-1]
    try:
        with open(os.path.join(store, "production", rel, path), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--work", help="keep the simulated world here (default: a temporary directory, removed on success)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="rlhf-scenario-")
    c = Checks()
    world = World(work, binary=args.binary, verbose=args.verbose)
    gh, h = world.github, world.harness
    hook = WebhookReceiver()
    artifact_store = os.path.join(work, "artifact-store")
    h.vars["RLHF_DEPLOY"] = "true"
    h.vars["RLHF_DASHBOARD"] = "true"
    h.secrets["RLHF_DEPLOY_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    try:
        root = project_root()
        with open(os.path.join(root, "workflow-template", "rlhf.yml"), "rb") as f:
            workflow = f.read()
        world.seed(
            {
                WORKFLOW: workflow,
                "rlhf-bot.yaml": team_config(world.feedback.url, gh.api_url, artifact_store, hook.url).encode(),
                "README.md": b"# Climate Economy assistant\n",
            }
        )
        sample = world.feedback.load_jsonl(os.path.join(root, "configs", "sample-feedback.jsonl"))
        newest = max(t for t in (_parse(r.get("updated_at")) for r in sample) if t is not None)
        DAY.update(simulated_days(newest))

        def day(n: int, **kw):
            print(f"\n[scenario] ===== day {n} ({DAY[n]}) =====", file=sys.stderr, flush=True)
            return h.trigger("schedule", WORKFLOW, runner_env={"RLHF_BOT_NOW": DAY[n]}, **kw)

        def prs():
            return sorted(gh.pulls.values(), key=lambda p: p["number"])

        # ---- day 0: a tampered release ----------------------------------------------------------
        gh.tamper_release(BOT_REPO, RELEASE_TAG, CPU_ASSET)
        run = day(0)
        check = run.job("check")
        c.expect(check.result == "failure", "day 0: the check job fails on a tampered release tarball")
        c.expect(check.step("Install rlhf-bot").conclusion == "failure", "day 0: it is the install step that fails")
        c.expect(any("sha256" in e for e in check.errors()), "day 0: the error names the sha256 mismatch", detail=str(check.errors()))
        c.expect(check.step("Pull new feedback").conclusion == "skipped", "day 0: no later step ran")
        c.expect(run.job("train").result == "skipped" and run.job("publish").result == "skipped", "day 0: train and publish are skipped")
        c.expect(not h.cache.entries() and not gh.pulls, "day 0: no state saved, no PR")
        gh.tamper_release(BOT_REPO, RELEASE_TAG, CPU_ASSET, on=False)

        # ---- day 1: first training -> one PR ----------------------------------------------------
        main0 = gh.ref_sha("refs/heads/main")
        run1 = day(1)
        c.expect(run1.conclusion == "success", "day 1: the run succeeds", detail=failure_detail(run1))
        c.expect(run1.job("check").outputs.get("retrain") == "true", "day 1: check decides to retrain")
        c.expect(run1.job("train").result == "success", "day 1: train succeeds", detail="\n".join(run1.job("train").log[-30:]))
        c.expect(run1.job("publish").result == "success", "day 1: publish succeeds", detail="\n".join(run1.job("publish").log[-30:]))
        c.expect(len(prs()) == 1 and prs()[0]["state"] == "open", "day 1: exactly one PR, open", detail=str([(p["number"], p["state"]) for p in prs()]))
        run_json = read_json(os.path.join(run1.job("train").temp, "run.json")) or {}
        stages = run_json.get("run") or {}
        reward_id, policy_id = stages.get("registered"), stages.get("registered_policy")
        c.expect(bool(reward_id) and bool(policy_id), "day 1: the train job registered a reward model and a policy", detail=str(stages)[:300])
        pr1 = prs()[0] if prs() else None
        if pr1:
            head = gh.ref_sha(f"refs/heads/{pr1['head']['ref']}")
            changed = gh.changed_files(main0, head)
            c.expect(pr1["head"]["ref"].startswith("rlhf-bot/"), "day 1: the PR comes from a bot branch", detail=pr1["head"]["ref"])
            c.expect("models/registry.yaml" in changed, "day 1: the PR changes models/registry.yaml", detail=str(changed))
            c.expect(any(p.startswith("reports/") and p.endswith("report.md") for p in changed), "day 1: the PR adds the report", detail=str(changed))
            registry = (gh.read_file(head, "models/registry.yaml") or b"").decode()
            c.expect(bool(policy_id) and policy_id in registry, "day 1: the PR's registry lists the new policy")
            c.expect(bool(pr1["body"]) and [l["name"] for l in pr1["labels"]] == ["rlhf-bot"], "day 1: the PR has the report as body and the label")
            c.expect([r["login"] for r in pr1["requested_reviewers"]] == ["octocat"], "day 1: the reviewer was requested")
            c.expect(gh.ref_sha("refs/heads/main") == main0, "day 1: main is unchanged (only the PR branch moved)")
        saved = [e for e in h.cache.entries() if e["run_id"] == run1.id]
        # Cache entries are immutable: the train job saves what it changed (feedback, training),
        # then the publish job saves the state that also records the PR it opened (newest wins).
        c.expect([e["job"] for e in saved] == ["train", "publish"] and [e["key"] for e in saved] == [f"rlhf-state-{run1.id}-1", f"rlhf-state-{run1.id}-1-published"], "day 1: the state is saved by the train job, then by the publish job (with the PR it opened)", detail=str(saved))
        meta = h.artifacts.meta(run1.id, "candidate") if "candidate" in h.artifacts.list(run1.id) else {}
        c.expect(meta.get("retention_days") == 1, "day 1: the candidate artifact is kept 1 day", detail=str(meta)[:300])
        c.expect(not any(f.endswith((".safetensors", ".bin", ".pt")) for f in meta.get("files", [])) and "models/registry.yaml" in meta.get("files", []), "day 1: the artifact carries the registry and metrics, no weights", detail=str(meta.get("files")))
        for jid in ("check", "train"):
            perms = run1.job(jid).token_permissions
            c.expect(all(v in ("read", "none") for v in perms.values()), f"day 1: the {jid} job's token can only read", detail=str(perms))

        # ---- day 2: nothing new -> nothing happens ----------------------------------------------
        branches_before = gh.branches()
        run2 = day(2)
        c.expect(run2.conclusion == "success", "day 2: the run succeeds", detail=failure_detail(run2))
        c.expect(run2.job("check").outputs.get("retrain") == "false", "day 2: check decides not to retrain", detail=str(read_json(os.path.join(run2.job("check").temp, "check.json")))[:600])
        c.expect(run2.job("train").result == "skipped" and run2.job("publish").result == "skipped", "day 2: no training job, no publish job")
        c.expect(gh.branches() == branches_before, "day 2: no commit on any branch")
        c.expect(len(prs()) == 1 and prs()[0]["state"] == "open", "day 2: the PR is still open, no new one")
        saved = [e for e in h.cache.entries() if e["run_id"] == run2.id]
        c.expect([e["job"] for e in saved] == ["check"], "day 2: the check job saved the state (no training followed)", detail=str(saved))

        # ---- merge: promotion ---------------------------------------------------------------------
        if pr1:
            push = gh.merge_pull(pr1["number"])
            print("\n[scenario] ===== merge PR #1 (push to main) =====", file=sys.stderr)
            runm = h.trigger("push", WORKFLOW, push=push, runner_env={"RLHF_BOT_NOW": DAY[2]})
            c.expect(runm is not None, "merge: the push to main (registry changed) starts a run")
            if runm:
                c.expect(runm.job("check").result == "skipped" and runm.job("train").result == "skipped", "merge: the push run does not pull or train")
                promoted = runm.job("promoted")
                c.expect(promoted.result == "success", "merge: the post-merge job succeeds", pending="`rlhf-bot registry show`", detail="\n".join(promoted.log[-15:]))
                c.expect(bool(policy_id) and policy_id in promoted.summary, "merge: the post-merge summary names the new production policy", pending="`rlhf-bot registry show` + the PR moving `production`")
                c.expect(promoted.step("Deploy").conclusion == "success", "merge: the deploy step succeeds", detail="\n".join(promoted.log[-30:]))
                deployed = read_json(os.path.join(promoted.temp, "deploy.json")) or {}
                actions = {k.get("kind"): (k.get("id"), k.get("action"), k.get("status")) for k in deployed.get("kinds", [])}
                c.expect(actions.get("policy") == (policy_id, "published", "complete") and actions.get("reward") == (reward_id, "published", "complete"), "merge: deploy published both production models, records complete", detail=str(deployed)[:600])
                manifest = read_json(os.path.join(artifact_store, "production", "policy", "manifest.json")) or {}
                c.expect(manifest.get("id") == policy_id and set(manifest.get("formats", {})) == {"hf", "gguf-q8_0"}, "merge: production/policy/manifest.json names the merged policy in the configured formats", detail=str(manifest)[:400])
                files_ok = bool(manifest) and all(
                    stored_sha256(artifact_store, fmt["uri"], f["path"]) == f["sha256"]
                    for fmt in manifest.get("formats", {}).values()
                    for f in fmt["files"]
                )
                c.expect(files_ok, "merge: every file the manifest lists is stored with its sha256")
                try:
                    with open(os.path.join(artifact_store, "production", "deployments.jsonl")) as f:
                        records = [json.loads(line) for line in f if line.strip()]
                except OSError:
                    records = []
                c.expect(sorted((r["kind"], r["id"], r["status"]) for r in records) == sorted([("policy", policy_id, "complete"), ("reward", reward_id, "complete")]), "merge: the deployment records say complete", detail=str(records)[:400])
                bodies = [json.loads(d["body"]) for d in hook.deliveries if d["ok"]]
                c.expect(len(hook.deliveries) == 2 and len(bodies) == 2 and {b["id"] for b in bodies} == {policy_id, reward_id}, "merge: the webhook received one signed notice per model", detail=str(hook.deliveries)[:400])
                c.expect("rlhf-bot deployment" in promoted.summary and "published" in promoted.summary, "merge: the summary shows the deployment", detail=promoted.summary[-400:])
                # The dashboard job publishes the Pages site after the deploy.
                dash = runm.job("dashboard")
                c.expect(dash.result == "success", "merge: the dashboard job publishes the Pages site", detail="\n".join(dash.log[-20:]))
                site = read_json(os.path.join(h.root, "pages", "data.json")) or {}
                shown_status = {v.get("id"): v.get("status") for v in site.get("versions", [])}
                c.expect(shown_status.get(policy_id) == "production" and shown_status.get(reward_id) == "production", "merge: the published dashboard shows the merged models as production", detail=str(shown_status)[:300])
                c.expect(site.get("deployed", {}).get("policy", {}).get("id") == policy_id, "merge: the dashboard shows the deployed policy", detail=str(site.get("deployed"))[:300])
                c.expect(bool(site.get("kpis")) and bool(site.get("curves", {}).get(policy_id)), "merge: the dashboard has KPI rows and the policy's training curves", detail=f"{len(site.get('kpis', []))} KPI rows, curves for {sorted(site.get('curves', {}))}")
                c.expect(dash.environment.get("url", "").endswith(".github.io/" + gh.name + "/"), "merge: the github-pages environment gets the site's URL", detail=str(dash.environment))
                page = open(os.path.join(h.root, "pages", "index.html"), encoding="utf-8").read() if os.path.isfile(os.path.join(h.root, "pages", "index.html")) else ""
                c.expect("actions/workflows/rlhf.yml" in page, "merge: the page links 'Retrain now' to this workflow", detail=page[:200])
            clone = world.checkout_main(os.path.join(work, "main-clone"))
            show = subprocess.run([world.binary, "registry", "show", "--config", "rlhf-bot.yaml", "--format", "json"], cwd=clone, capture_output=True, text=True)
            shown = None
            try:
                shown = json.loads(show.stdout)
            except json.JSONDecodeError:
                pass
            production = (shown or {}).get("production") or {}
            c.expect(
                production.get("policy") == policy_id and production.get("reward") == reward_id and isinstance((shown or {}).get("candidates"), list) and isinstance((shown or {}).get("models"), list),
                "merge: `registry show --format json` on main names the merged reward model and policy as production",
                pending="`registry show` + the PR moving `production`",
                detail=(show.stdout[:300] + show.stderr[-300:]),
            )

        # ---- day 3: the next check sees the promotion -------------------------------------------
        run3 = day(3)
        check3 = read_json(os.path.join(run3.job("check").temp, "check.json")) or {}
        c.expect(run3.job("check").outputs.get("retrain") == "false", "day 3: nothing new, no retraining", detail=str(check3)[:400])
        c.expect(bool(policy_id) and check3.get("production_version") == policy_id, "day 3: check reports the merged policy as production", pending="the PR moving `production`", detail=str(check3.get("production_version")))
        c.expect(len(prs()) == 1, "day 3: no new PR")

        # ---- day 4: new feedback -> a new PR, closed without merging -----------------------------
        world.feedback.add(new_records(4, 120, sample))
        before = {p["number"] for p in prs()}
        run4 = day(4)
        c.expect(run4.job("check").outputs.get("retrain") == "true", "day 4: new feedback -> retrain")
        c.expect(run4.conclusion == "success", "day 4: the run succeeds", detail=failure_detail(run4))
        new = [p for p in prs() if p["number"] not in before]
        c.expect(len(new) == 1 and new[0]["state"] == "open", "day 4: exactly one new PR", detail=str([(p["number"], p["state"]) for p in prs()]))
        if new:
            gh.close_pull(new[0]["number"])
        rejected = (read_json(os.path.join(run4.job("train").temp, "run.json")) or {}).get("run") or {}

        # ---- day 5: the rejected model is not proposed again ------------------------------------
        before = {p["number"] for p in prs()}
        mark = len(gh.requests)
        run5 = day(5)
        c.expect(run5.conclusion == "success", "day 5: the run succeeds", detail=failure_detail(run5))
        again = [p for p in prs() if p["number"] not in before]
        c.expect(not again, "day 5: no new PR after the closed one (the same model is not proposed again)", pending="recording a closed, unmerged bot PR as a rejection", detail=f"new PRs {[(p['number'], p['title']) for p in again]} after rejecting {rejected.get('registered_policy')}")
        c.expect(any(r["method"] == "GET" and "/pulls?" in r["path"] and "state=closed" in r["path"] for r in gh.requests), "day 5: the bot looked up closed PRs", pending="the bot reading closed PRs")

        # ---- day 5, later: a person starts a forced dry run from the Actions tab ------------------
        before = {p["number"] for p in prs()}
        print("\n[scenario] ===== day 5: workflow_dispatch force=true dry_run=true algo=dpo =====", file=sys.stderr, flush=True)
        rund = h.trigger("workflow_dispatch", WORKFLOW, inputs={"force": "true", "dry_run": "true", "algo": "dpo"}, runner_env={"RLHF_BOT_NOW": DAY[5]})
        c.expect(rund.conclusion == "success", "dispatch: the forced dry run succeeds", detail=failure_detail(rund))
        c.expect(rund.job("check").outputs.get("retrain") == "true", "dispatch: force=true makes check retrain")
        c.expect("dry-run-pr" in h.artifacts.list(rund.id) and any(f.endswith("pr.json") for f in h.artifacts.meta(rund.id, "dry-run-pr")["files"]), "dispatch: the dry-run PR is kept as the artifact dry-run-pr")
        c.expect({p["number"] for p in prs()} == before, "dispatch: a dry run opens no PR")

        # ---- day 6: the feedback API is down -----------------------------------------------------
        world.feedback.stop()
        run6 = day(6)
        check6 = run6.job("check")
        bot_errors = [e for e in check6.errors() if not e.startswith("Process completed with exit code")]
        c.expect(check6.result == "failure" and check6.step("Pull new feedback").conclusion == "failure", "day 6: the check job fails at the pull")
        c.expect(run6.job("train").result == "skipped", "day 6: nothing else runs")
        c.expect(len(bot_errors) == 1, "day 6: exactly one error annotation from rlhf-bot", pending="one ::error:: for an unreachable API", detail=str(bot_errors))

        c.expect(not gh.unhandled, "no API call the harness does not implement", detail=str(gh.unhandled))
        c.expect(not [r for r in gh.requests if r["status"] in (401, 403)], "no request was refused for its token")
    finally:
        world.stop()
        hook.stop()
    status = c.report()
    if status == 0 and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"[scenario] world kept in {work}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
