#!/usr/bin/env python3
"""The thin-submitter workflow (workflow-template/rlhf-ray.yml, docs/ray.md), run the way GitHub
runs it against a loopback GitHub and feedback API, a real Ray head (CPU, loopback, token auth)
and a moto S3 server as the artifact bucket both the runner and the cluster reach.

    python3 tests/gha/scenario_ray.py --binary target/debug/rlhf-bot [--work DIR] [-v]

One scheduled run with the sample feedback: the train job, on a standard runner with the CPU
build, exports the dataset to the bucket, submits the reward training to the cluster (our own
binary as the job's entrypoint), streams its log, reads the model back, evaluates and registers
it, then the policy as a second job; the publish job opens one PR whose registry entries name
the cluster jobs.

Needs $RLHF_TEST_DEPS/ray-venv (ray[default]) and $RLHF_TEST_DEPS/venv (moto[server], PyYAML),
both from scripts/install-test-deps.sh. Exit status 1 when any expectation failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gha.world import World, project_root  # noqa: E402
import yaml  # noqa: E402
from scenario_rlhf import Checks, failure_detail, read_json  # noqa: E402
from scenario_rlhf import team_config as rlhf_team_config  # noqa: E402

WORKFLOW = ".github/workflows/rlhf.yml"
TOKEN = "ray-scenario-token-7c2e"
BUCKET = "team-models"


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 20000:  # outside Ray's default worker port range
            return port


def wait_for(url: str, headers: dict, seconds: float, what: str, log: str) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                if r.status < 500:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.time() > deadline:
            sys.exit(f"scenario_ray: {what} did not answer within {seconds:.0f} s; log {log}")
        time.sleep(0.5)


class Servers:
    """moto and a Ray head, each under a process group of its own, stopped in `stop`."""

    def __init__(self, deps: str, work: str):
        self.procs: list[subprocess.Popen] = []
        self.moto_port = free_port()
        moto_log = os.path.join(work, "moto.log")
        self.procs.append(subprocess.Popen(
            [os.path.join(deps, "venv/bin/moto_server"), "-H", "127.0.0.1", "-p", str(self.moto_port)],
            stdout=open(moto_log, "w"), stderr=subprocess.STDOUT, start_new_session=True))
        self.ray_temp = tempfile.mkdtemp(prefix="rlhf-ray-")
        self.ray_port = free_port()
        ray_log = os.path.join(work, "ray.log")
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
        self.procs.append(subprocess.Popen(
            [os.path.join(deps, "ray-venv/bin/ray"), "start", "--head", "--block", "--port=0", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.ray_port}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats", f"--temp-dir={self.ray_temp}"],
            stdout=open(ray_log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        wait_for(self.moto_url, {}, 90, "moto", moto_log)
        # moto answers unsigned requests; create the bucket the config names.
        urllib.request.urlopen(urllib.request.Request(f"{self.moto_url}/{BUCKET}", method="PUT"), timeout=10)
        wait_for(f"{self.ray_url}/api/jobs/", {"Authorization": f"Bearer {TOKEN}", "User-Agent": "scenario"}, 180, "the Ray head", ray_log)

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def ray_url(self) -> str:
        return f"http://127.0.0.1:{self.ray_port}"

    def job(self, submission_id: str) -> dict:
        req = urllib.request.Request(f"{self.ray_url}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {TOKEN}", "User-Agent": "scenario"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.load(r)
        except Exception as e:  # noqa: BLE001
            return {"error": str(e)}

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, 15)  # `ray start --block` takes its head down on SIGTERM
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        shutil.rmtree(self.ray_temp, ignore_errors=True)


def team_config(feedback_url: str, api_url: str, binary: str, ray_url: str) -> str:
    """scenario_rlhf's team config with both models trained on the cluster (the policy as DPO for
    two steps from scratch, a second job): the artifact store is the bucket, no deploy."""
    cfg = yaml.safe_load(rlhf_team_config(feedback_url, api_url, f"s3://{BUCKET}/rlhf", "http://unused"))
    cfg.pop("deploy", None)
    cfg["train"] = {
        "backend": "ray",
        "ray": {
            "address": ray_url,
            "token_env": "RAY_AUTH_TOKEN",
            "entrypoint": "rlhf-bot",
            "rlhf_bot_command": binary,
            "forward_env": ["AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"],
            "num_cpus": 0,
            "poll_first_secs": 0.5,
            "poll_max_secs": 2,
        },
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--work", help="keep the simulated world here (default: a temporary directory, removed on success)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    deps = os.environ.get("RLHF_TEST_DEPS") or os.path.expanduser("~/.cache/rlhf-bot/test-deps")
    if not os.path.exists(os.path.join(deps, "ray-venv/bin/ray")):
        if os.environ.get("RLHF_SKIP_RAY", "") not in ("", "0", "false"):
            print("scenario_ray: SKIPPED (RLHF_SKIP_RAY is set)", file=sys.stderr)
            return 0
        sys.exit("scenario_ray: Ray is missing; hint: scripts/install-test-deps.sh (or RLHF_SKIP_RAY=1 to skip)")

    work = args.work or tempfile.mkdtemp(prefix="rlhf-scenario-ray-")
    os.makedirs(work, exist_ok=True)
    c = Checks()
    servers = Servers(deps, work)
    world = World(work, binary=args.binary, verbose=args.verbose)
    gh, h = world.github, world.harness
    h.secrets.update({"RLHF_RAY_TOKEN": TOKEN, "RLHF_AWS_ACCESS_KEY_ID": "testing", "RLHF_AWS_SECRET_ACCESS_KEY": "testing"})
    h.vars.update({"RLHF_AWS_REGION": "us-east-1", "RLHF_AWS_ENDPOINT_URL": servers.moto_url})
    try:
        with open(os.path.join(project_root(), "workflow-template", "rlhf-ray.yml"), "rb") as f:
            workflow = f.read()
        world.seed({
            WORKFLOW: workflow,
            "rlhf-bot.yaml": team_config(world.feedback.url, gh.api_url, world.binary, servers.ray_url).encode(),
            "README.md": b"# Climate Economy assistant\n",
        })
        world.feedback.load_jsonl(os.path.join(project_root(), "configs", "sample-feedback.jsonl"))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
        # The object store is plain http here: an opt-in only a test server gets.
        run = h.trigger("schedule", WORKFLOW, runner_env={"RLHF_BOT_NOW": now, "AWS_ALLOW_HTTP": "true"})
        c.expect(run.conclusion == "success", "the run succeeds", detail=failure_detail(run))
        train = run.job("train")
        c.expect(train.result == "success", "the train job (a thin submitter) succeeds", detail="\n".join(train.log[-40:]))
        stages = (read_json(os.path.join(train.temp, "run.json")) or {}).get("run") or {}
        reward_id = stages.get("registered")
        c.expect(bool(reward_id), "it registered a reward model", detail=str(stages)[:300])
        job_id = f"gh-{run.id}"
        job = servers.job(job_id)
        c.expect(job.get("status") == "SUCCEEDED", f"the cluster ran job {job_id} to SUCCEEDED", detail=str(job)[:300])
        c.expect(any("ray job: " in line and "training the reward model" in line for line in train.log), "the job's log is streamed into the train job's log")
        policy_id = stages.get("registered_policy")
        c.expect(bool(policy_id), "it registered a policy", detail=str(stages)[:300])
        policy_job = servers.job(f"{job_id}-policy")
        c.expect(policy_job.get("status") == "SUCCEEDED", f"the cluster ran the policy job {job_id}-policy to SUCCEEDED", detail=str(policy_job)[:300])
        c.expect(not any(TOKEN in line for line in train.log), "the cluster token never reaches the log")
        pulls = sorted(gh.pulls.values(), key=lambda p: p["number"])
        c.expect(len(pulls) == 1, "one PR is opened", detail=str([(p["number"], p["state"]) for p in pulls]))
        if pulls:
            head = gh.ref_sha(f"refs/heads/{pulls[0]['head']['ref']}")
            registry = (gh.read_file(head, "models/registry.yaml") or b"").decode()
            c.expect("cluster_job:" in registry and f"submission_id: {job_id}" in registry,
                     "the PR's registry entry names the cluster job", detail=registry[:600])
            c.expect(f"submission_id: {job_id}-policy" in registry,
                     "the PR's registry names the policy's own cluster job", detail=registry[:600])
            report = (gh.read_file(head, f"reports/{job_id}/report.md") or b"").decode()
            c.expect(f"trained by the cluster: `ray` job `{job_id}`" in report, "the report in the PR names the cluster job", detail=report[-600:])
    finally:
        world.stop()
        servers.stop()
    status = c.report()
    if status == 0 and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
