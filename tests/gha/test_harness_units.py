"""Unit tests of the harness's own pieces (no bot needed): the expression evaluator against
GitHub's documented semantics, file-command parsing, filter patterns, and the emulated cache and
artifact actions run through a tiny workflow. Run: python3 -m unittest tests/gha/test_harness_units.py
"""

import os
import shutil
import sys
import tempfile
import textwrap
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gha import expr  # noqa: E402
from gha.engine import Harness, HarnessError, _parse_file_commands, filter_matches  # noqa: E402
from gha.expr import ExprError, Scope  # noqa: E402
from gha.github import GitHub  # noqa: E402


def ev(text, **ctx):
    return expr.eval_expr(text, Scope({k.lower(): v for k, v in ctx.items()}, status=lambda fn: fn != "failure" and fn != "cancelled"))


class ExprTests(unittest.TestCase):
    def test_literals_and_coercion(self):
        self.assertEqual(ev("null"), None)
        self.assertEqual(ev("0x10"), 16.0)
        self.assertEqual(ev("-2.5e1"), -25.0)
        self.assertEqual(ev("'it''s'"), "it's")
        self.assertTrue(ev("'' == 0"))
        self.assertTrue(ev("null == 0"))
        self.assertTrue(ev("true == 1"))
        self.assertTrue(ev("'ABC' == 'abc'"))
        self.assertFalse(ev("'abc' == 1"))
        self.assertTrue(ev("'1' == 1"))
        self.assertFalse(ev("'NaN' == 'x'") is None)

    def test_logic_returns_operands(self):
        self.assertEqual(ev("'' || 'default'"), "default")
        self.assertEqual(ev("'a' && 'b'"), "b")
        self.assertEqual(ev("0 && 'b'"), 0.0)
        self.assertEqual(ev("vars.X && 'cuda' || 'cpu'", vars={}), "cpu")
        self.assertEqual(ev("vars.X && 'cuda' || 'cpu'", vars={"X": "gpu"}), "cuda")
        self.assertTrue(ev("!''"))
        self.assertTrue(ev("1 < 2 && 'b' > 'A'"))

    def test_property_access_is_case_insensitive_and_missing_is_null(self):
        ctx = {"steps": {"decide": {"outputs": {"retrain": "true"}}}}
        self.assertEqual(ev("steps.decide.outputs.retrain", **ctx), "true")
        self.assertEqual(ev("STEPS.Decide['outputs'].RETRAIN", **ctx), "true")
        self.assertIsNone(ev("steps.nope.outputs.x", **ctx))
        self.assertEqual(ev("needs.train.outputs.run-id", needs={"train": {"outputs": {"run-id": "gh-1"}}}), "gh-1")

    def test_functions(self):
        self.assertTrue(ev("contains('Hello', 'ell')"))
        self.assertTrue(ev("contains(fromJSON('[1, 2]'), 2)"))
        self.assertTrue(ev("startsWith('rlhf-bot/x', 'RLHF')"))
        self.assertEqual(ev("format('{0}-{{x}}-{1}', 'a', 3)"), "a-{x}-3")
        self.assertEqual(ev("join(fromJSON('[\"a\",\"b\"]'), '+')"), "a+b")
        self.assertEqual(ev("toJSON(true)"), "true")
        self.assertEqual(ev("fromJSON('{\"a\": {\"b\": 1}}').a.b"), 1.0)

    def test_unknown_syntax_fails_loudly(self):
        for bad in ("a.*.b", "foo(1)", "1 + 2", '"double"', "a ==", "github.sha ~ 1", "format('{0}')"):
            with self.assertRaises(ExprError, msg=bad):
                ev(bad, a={}, github={"sha": "x"})
        with self.assertRaises(ExprError):
            ev("nocontext.x")

    def test_interpolation_and_conditions(self):
        scope = Scope({"inputs": {"force": True}, "env": {"A": "1"}}, status=lambda fn: fn == "always" or fn == "success")
        self.assertEqual(expr.interpolate("x=${{ inputs.force }} a=${{ env.A }}", scope), "x=true a=1")
        self.assertIs(expr.interpolate("${{ inputs.force }}", scope), True)
        self.assertEqual(expr.interpolate("${{ '}}' }}", scope), "}}")
        self.assertTrue(expr.condition("inputs.force", scope))
        self.assertTrue(expr.condition("${{ inputs.force }}", scope))
        failed = Scope({}, status=lambda fn: fn in ("always", "failure"))
        self.assertFalse(expr.condition("true", failed))
        self.assertTrue(expr.condition("${{ !cancelled() }}", failed))
        self.assertTrue(expr.condition("failure()", failed))
        with self.assertRaises(ExprError):
            expr.condition("${{ true }} && false", scope)


class FileCommandTests(unittest.TestCase):
    def test_heredoc_and_plain(self):
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("a=1\nb<<EOF\nline1\nline2\nEOF\nc=x=y\n")
        self.assertEqual(_parse_file_commands(f.name, "GITHUB_OUTPUT"), {"a": "1", "b": "line1\nline2", "c": "x=y"})
        with open(f.name, "w") as g:
            g.write("b<<EOF\nnever closed\n")
        with self.assertRaises(HarnessError):
            _parse_file_commands(f.name, "GITHUB_OUTPUT")

    def test_filter_patterns(self):
        self.assertTrue(filter_matches(["main"], "main"))
        self.assertFalse(filter_matches(["main"], "mainline"))
        self.assertTrue(filter_matches(["models/registry.yaml"], "models/registry.yaml"))
        self.assertTrue(filter_matches(["models/**"], "models/a/b.yaml"))
        self.assertFalse(filter_matches(["models/*"], "models/a/b.yaml"))
        self.assertFalse(filter_matches(["**", "!docs/**"], "docs/x.md"))


WORKFLOW = textwrap.dedent(
    """\
    name: units
    on:
      workflow_dispatch:
        inputs:
          flag: {type: boolean, default: false}
    permissions: {}
    jobs:
      first:
        runs-on: ubuntu-latest
        permissions: {contents: read}
        outputs:
          value: ${{ steps.s.outputs.value }}
          secret: ${{ steps.s.outputs.secret }}
        steps:
          - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683
          - uses: actions/cache/restore@5a3ec84eff668545956fd18022155c47e93e2684
            id: restore
            with: {path: .state/, key: 'st-${{ github.run_id }}', restore-keys: st-}
          - id: s
            env:
              TOKEN: ${{ secrets.TOKEN }}
            run: |
              mkdir -p .state out
              n=$(cat .state/n 2>/dev/null || echo 0); echo $((n + 1)) > .state/n
              echo "hello" > out/visible.txt; echo "x" > out/.hidden
              echo "value=$(cat .state/n)" >> "$GITHUB_OUTPUT"
              echo "secret=$TOKEN" >> "$GITHUB_OUTPUT"
              echo "FROM_ENV_FILE=yes" >> "$GITHUB_ENV"
              echo "::error title=t::one problem"
              echo "summary line" >> "$GITHUB_STEP_SUMMARY"
              echo "token is $TOKEN"
          - run: test "$FROM_ENV_FILE" = yes && test -z "${GITHUB_TOKEN:-}"
          - uses: actions/cache/save@5a3ec84eff668545956fd18022155c47e93e2684
            with: {path: .state/, key: 'st-${{ github.run_id }}'}
          - uses: actions/cache/save@5a3ec84eff668545956fd18022155c47e93e2684
            with: {path: .state/, key: 'st-${{ github.run_id }}'}
          - uses: actions/upload-artifact@ea165f8d65b6e75b540449e92b4886f43607fa02
            with: {name: out, path: out/, retention-days: 1}
      second:
        needs: first
        if: needs.first.outputs.value == '2' || inputs.flag
        runs-on: ubuntu-latest
        steps:
          - uses: actions/download-artifact@d3f86a106a0bac45b974a628896c90dbdf5c8093
            with: {name: out, path: got}
          - run: test -f got/visible.txt && test ! -e got/.hidden
          - run: exit 3
          - if: failure()
            run: echo "cleanup ran"
          - run: echo "never"
    """
)


class EngineTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="gha-units-")
        self.gh = GitHub(self.tmp, "acme", "assistant")
        self.gh.start()
        self.gh.commit_files("main", {".github/workflows/w.yml": WORKFLOW.encode()}, "init")
        self.h = Harness(os.path.join(self.tmp, "h"), self.gh, secrets={"TOKEN": "s3cr3t-value"})

    def tearDown(self):
        self.gh.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_state_outputs_artifacts_and_status(self):
        run1 = self.h.trigger("workflow_dispatch", ".github/workflows/w.yml")
        first = run1.job("first")
        self.assertEqual(first.result, "success")
        self.assertEqual(first.outputs, {"value": "1"})  # the secret output is dropped
        self.assertIn("Skip output 'secret' since it may contain secret.", [a["message"] for a in first.annotations])
        self.assertEqual(first.errors(), ["one problem"])
        self.assertIn("token is ***", first.log_text())
        self.assertNotIn("s3cr3t-value", first.log_text())
        self.assertEqual(first.summary, "summary line\n")
        self.assertTrue(any("Unable to reserve cache" in a["message"] for a in first.annotations))
        self.assertEqual(run1.job("second").result, "skipped")
        self.assertEqual(self.h.artifacts.meta(run1.id, "out")["files"], ["visible.txt"])

        run2 = self.h.trigger("workflow_dispatch", ".github/workflows/w.yml", inputs={"flag": "false"})
        self.assertEqual(run2.job("first").outputs["value"], "2")  # restored by prefix, newest
        second = run2.job("second")
        self.assertEqual(second.result, "failure")
        self.assertEqual([s.conclusion for s in second.steps], ["success", "success", "failure", "success", "skipped"])
        self.assertEqual(run2.conclusion, "failure")
        with self.assertRaises(HarnessError):
            self.h.trigger("workflow_dispatch", ".github/workflows/w.yml", inputs={"nope": "1"})
        self.assertIsNone(self.h.trigger("schedule", ".github/workflows/w.yml"))


COMPOSITE_WORKFLOW = textwrap.dedent(
    """\
    name: composite
    on: workflow_dispatch
    jobs:
      one:
        runs-on: ubuntu-latest
        steps:
          - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683
          - id: greet
            uses: ./.github/actions/greet
            with: {who: world}
          - run: test "${{ steps.greet.outputs.text }}" = "hello world" && test "$GREETED" = yes && command -v greet-tool
    """
)

COMPOSITE_ACTION = textwrap.dedent(
    """\
    name: greet
    inputs:
      who: {required: true}
      token: {default: '${{ github.token }}'}
    outputs:
      text: {value: '${{ steps.say.outputs.text }}'}
    runs:
      using: composite
      steps:
        - id: say
          shell: bash
          env: {WHO: '${{ inputs.who }}', TOKEN: '${{ inputs.token }}'}
          run: |
            test -n "$TOKEN" && test -f "$GITHUB_ACTION_PATH/action.yml"
            echo "text=hello $WHO" >> "$GITHUB_OUTPUT"
            echo "GREETED=yes" >> "$GITHUB_ENV"
            mkdir -p "$RUNNER_TEMP/bin" && printf '#!/bin/sh\\n' > "$RUNNER_TEMP/bin/greet-tool" && chmod +x "$RUNNER_TEMP/bin/greet-tool"
            echo "$RUNNER_TEMP/bin" >> "$GITHUB_PATH"
    """
)


class CompositeTests(unittest.TestCase):
    def test_inputs_outputs_env_and_path_cross_the_boundary(self):
        tmp = tempfile.mkdtemp(prefix="gha-composite-")
        gh = GitHub(tmp, "acme", "assistant")
        gh.start()
        try:
            gh.commit_files("main", {".github/workflows/c.yml": COMPOSITE_WORKFLOW.encode(), ".github/actions/greet/action.yml": COMPOSITE_ACTION.encode()}, "init")
            h = Harness(os.path.join(tmp, "h"), gh)
            run = h.trigger("workflow_dispatch", ".github/workflows/c.yml")
            self.assertEqual(run.job("one").result, "success", run.job("one").log_text())
            bad = COMPOSITE_ACTION.replace("${{ inputs.who }}", "${{ secrets.X }}")
            gh.commit_files("main", {".github/actions/greet/action.yml": bad.encode()}, "secrets")
            with self.assertRaises(HarnessError):  # composite actions see no secrets
                h.trigger("workflow_dispatch", ".github/workflows/c.yml")
        finally:
            gh.stop()
            shutil.rmtree(tmp, ignore_errors=True)


class GitHubApiTests(unittest.TestCase):
    """The loopback API through HTTP, as the bot calls it (percent-encoded refs included)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="gha-api-")
        self.gh = GitHub(self.tmp, "acme", "assistant")
        self.gh.start()
        self.base = self.gh.commit_files("main", {"README.md": b"hi\n"}, "init")
        self.gh.add_token("w", {"contents": "write", "pull-requests": "write", "issues": "write", "metadata": "read"})
        self.gh.add_token("r", {"contents": "read", "metadata": "read"})

    def tearDown(self):
        self.gh.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def call(self, method, path, body=None, token="w"):
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.gh.api_url + "/repos/acme/assistant" + path, method=method, data=json.dumps(body).encode() if body is not None else None, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def test_git_data_flow_pull_request_and_merge(self):
        status, ref = self.call("GET", "/git/ref/heads%2Fmain")
        self.assertEqual((status, ref["object"]["sha"]), (200, self.base))
        self.assertEqual(self.call("GET", "/git/ref/heads%2Fnope")[0], 404)
        commit = self.call("GET", f"/git/commits/{self.base}")[1]
        blob = self.call("POST", "/git/blobs", {"content": "cmVnOiAx", "encoding": "base64"})[1]
        tree = self.call("POST", "/git/trees", {"base_tree": commit["tree"]["sha"], "tree": [{"path": "models/registry.yaml", "mode": "100644", "type": "blob", "sha": blob["sha"]}]})[1]
        self.assertEqual(sorted(e["path"] for e in tree["tree"]), ["README.md", "models"])
        new = self.call("POST", "/git/commits", {"message": "x\n\nRlhf-Bot-Run: 1\n", "tree": tree["sha"], "parents": [self.base]})[1]
        self.assertEqual(self.call("POST", "/git/refs", {"ref": "refs/heads/rlhf-bot/a", "sha": new["sha"]})[0], 201)
        self.assertEqual(self.call("POST", "/git/refs", {"ref": "refs/heads/rlhf-bot/a", "sha": new["sha"]})[0], 422)
        self.assertEqual(self.call("PATCH", "/git/refs/heads%2Frlhf-bot%2Fa", {"sha": self.base, "force": False})[1]["message"], "Update is not a fast forward")
        self.assertEqual(self.call("POST", "/pulls", {"title": "t", "head": "rlhf-bot/a", "base": "main"}, token="r")[0], 403)
        status, pr = self.call("POST", "/pulls", {"title": "t", "head": "rlhf-bot/a", "base": "main", "body": "b", "draft": False})
        self.assertEqual((status, pr["number"], pr["head"]["ref"], pr["head"]["repo"]["full_name"], pr["state"]), (201, 1, "rlhf-bot/a", "acme/assistant", "open"))
        self.assertEqual(self.call("POST", "/pulls", {"title": "t", "head": "rlhf-bot/a", "base": "main"})[0], 422)
        self.assertEqual(len(self.call("GET", "/pulls?state=open&base=main&per_page=100&page=1")[1]), 1)
        self.assertEqual(len(self.call("GET", "/pulls?state=closed")[1]), 0)
        self.assertEqual(self.call("POST", "/issues/1/labels", {"labels": ["rlhf-bot"]})[1][0]["name"], "rlhf-bot")
        self.assertEqual(self.call("POST", "/issues/1/comments", {"body": "c"})[0], 201)
        self.assertEqual([c["body"] for c in self.call("GET", "/issues/1/comments")[1]], ["c"])
        push = self.gh.merge_pull(1)
        self.assertEqual(push["before"], self.base)
        self.assertEqual(self.gh.read_file("main", "models/registry.yaml"), b"reg: 1")
        closed = self.call("GET", "/pulls?state=closed&head=acme%3Arlhf-bot%2Fa")[1]
        self.assertEqual((len(closed), bool(closed[0]["merged_at"])), (1, True))
        self.assertEqual(self.gh.unhandled, [])
        self.assertEqual(self.call("GET", "/actions/runs")[0], 404)
        self.assertEqual(len(self.gh.unhandled), 1)


if __name__ == "__main__":
    unittest.main()
