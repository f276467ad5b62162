#!/usr/bin/env python3
"""Run a team's rlhf-bot workflow the way GitHub does, on this machine (docs/workflow-harness.md).

    python3 tests/gha/run_workflow.py --binary target/debug/rlhf-bot --repo-dir ../assistant \
        [--workflow .github/workflows/rlhf.yml] [--config rlhf-bot.yaml] \
        [--feedback configs/sample-feedback.jsonl] [--event schedule] [--input force=true] \
        [--var NAME=VALUE] [--secret NAME=VALUE] [--now 2026-12-01T05:17:00Z] [--runs 2] [-v]

The repository directory's files (git-tracked ones when it is a git repository) become the
simulated repository's main branch, plus `rlhf-bot.harness.yaml`: the team's config pointed at
the loopback feedback API and GitHub (the variable RLHF_CONFIG names it). `--runs N` fires the
event N times in a row (the cache carries the state between them). Exit status 0 when every run
succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gha.engine import HarnessError  # noqa: E402
from gha.world import World, harness_config  # noqa: E402


def pairs(values: list[str], what: str) -> dict:
    out = {}
    for v in values:
        if "=" not in v:
            sys.exit(f"run_workflow: {what} {v!r} is not NAME=VALUE")
        k, _, val = v.partition("=")
        out[k] = val
    return out


def repo_files(directory: str) -> dict[str, bytes]:
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, ".git")):
        names = subprocess.run(["git", "-C", directory, "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    else:
        names = []
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            names += [os.path.relpath(os.path.join(dirpath, f), directory) for f in filenames]
    out = {}
    for n in filter(None, names):
        path = os.path.join(directory, n)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[n] = f.read()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="the rlhf-bot binary to publish as the release asset")
    ap.add_argument("--repo-dir", required=True, help="the team's repository (its files become main)")
    ap.add_argument("--workflow", default=".github/workflows/rlhf.yml", help="workflow path inside the repository")
    ap.add_argument("--workflow-file", help="use this local file as the workflow (placed at --workflow)")
    ap.add_argument("--config", default="rlhf-bot.yaml", help="the team's config path inside the repository")
    ap.add_argument("--feedback", help="JSONL records the loopback feedback API serves")
    ap.add_argument("--event", default="schedule", choices=["schedule", "workflow_dispatch"])
    ap.add_argument("--input", action="append", default=[], help="workflow_dispatch input NAME=VALUE")
    ap.add_argument("--var", action="append", default=[], help="repository variable NAME=VALUE")
    ap.add_argument("--secret", action="append", default=[], help="secret NAME=VALUE")
    ap.add_argument("--now", help="RLHF_BOT_NOW for every step (the simulated clock)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--work", help="keep the simulated world here (default: a temporary directory)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every log line")
    args = ap.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="rlhf-gha-")
    world = World(work, binary=args.binary, verbose=args.verbose)
    try:
        files = repo_files(args.repo_dir)
        if args.workflow_file:
            with open(args.workflow_file, "rb") as f:
                files[args.workflow] = f.read()
        if args.workflow not in files:
            sys.exit(f"run_workflow: {args.workflow} is not in {args.repo_dir}\nhint: copy workflow-template/rlhf.yml there, or pass --workflow-file")
        if args.config not in files:
            sys.exit(f"run_workflow: the config {args.config} is not in {args.repo_dir}\nhint: pass --config with its path inside the repository")
        files["rlhf-bot.harness.yaml"] = harness_config(
            files[args.config].decode(), world.feedback.url, world.github.api_url, world.github.full_name
        ).encode()
        world.seed(files)
        world.harness.vars["RLHF_CONFIG"] = "rlhf-bot.harness.yaml"
        world.harness.vars.update(pairs(args.var, "--var"))
        world.harness.secrets.update(pairs(args.secret, "--secret"))
        if args.feedback:
            world.feedback.load_jsonl(args.feedback)
        env = {"RLHF_BOT_NOW": args.now} if args.now else {}
        ok = True
        for _ in range(args.runs):
            run = world.harness.trigger(args.event, args.workflow, inputs=pairs(args.input, "--input") or None, runner_env=env)
            if run is None:
                print(f"{args.workflow}: the event {args.event} starts no run")
                return 1
            print(f"\nrun {run.id} ({run.event}): {run.conclusion}")
            for jid, job in run.jobs.items():
                print(f"  {jid}: {job.result}  {json.dumps(job.outputs) if job.outputs else ''}")
                for s in job.steps:
                    print(f"    [{s.conclusion:>7}] {s.name}")
                for a in job.annotations:
                    print(f"    {a['level']}: {a['message']}")
                if job.runner_dir:
                    print(f"    log and files: {job.runner_dir}")
            ok = ok and run.conclusion == "success"
        print("\npull requests:")
        for pr in world.github.pulls.values():
            state = "merged" if pr["merged_at"] else pr["state"]
            print(f"  #{pr['number']} [{state}] {pr['title']} ({pr['head']['ref']})")
        if world.github.unhandled:
            print(f"\nAPI calls the harness does not implement: {world.github.unhandled}")
            ok = False
        print(f"\nworld kept in {work}")
        return 0 if ok else 1
    except HarnessError as e:
        print(f"run_workflow: {e}", file=sys.stderr)
        return 2
    finally:
        world.stop()


if __name__ == "__main__":
    sys.exit(main())
