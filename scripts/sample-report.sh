#!/usr/bin/env bash
# Renders docs/sample-report/ (report.md, its plots, metrics.json) from the tiny config with the
# bundled sample feedback plus a seeded flood (one user's 150 thumbs-down on policy-v2 within 25
# minutes) that arrives after the last training, the bundled behaviour tests (configs/evals) and
# the bundled principles (configs/principles.yaml): a first `run --force` records the principles,
# `constitution` makes pairs, the principles are edited, `constitution` runs again, and the second `run --force` renders
# the report, so it shows the Integrity section, the eval gate and the constitution's changes.
#   scripts/sample-report.sh            (uses target/debug/rlhf-bot; RLHF_BOT=path to override)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${RLHF_BOT:-target/debug/rlhf-bot}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - configs/sample-feedback.jsonl "$work/flooded.jsonl" <<'EOF'
import json, sys
from datetime import datetime, timedelta, timezone
src, dst = sys.argv[1], sys.argv[2]
lines = open(src, encoding="utf-8").read().splitlines()
answers, seen = [], set()
for line in lines:
    try:
        r = json.loads(line)
    except ValueError:
        continue  # the sample keeps a few malformed lines on purpose (quarantine)
    key = (r.get("conversation_id"), r.get("message_id"))
    if r.get("model_version") == "policy-v2" and "response" in r and key not in seen:
        seen.add(key)
        answers.append(r)
start = datetime(2026, 11, 26, 20, 0, tzinfo=timezone.utc)
with open(dst, "w", encoding="utf-8") as out:
    out.write("\n".join(lines) + "\n")
    for k in range(150):
        a = answers[k % len(answers)]
        t = (start + timedelta(seconds=10 * k)).strftime("%Y-%m-%dT%H:%M:%SZ")
        flood = {key: a[key] for key in ("conversation_id", "message_id", "model_version", "prompt", "response")}
        flood.update({"id": f"flood_{k:03d}", "kind": "thumb", "thumb": "down", "source": "end_user",
                      "user_id": "u_flood", "created_at": t, "updated_at": t})
        out.write(json.dumps(flood) + "\n")
EOF
sed -e "s|configs/sample-feedback.jsonl|$work/feedback.jsonl|" \
    -e "s|\.rlhf/tiny|$work/store|g" \
    -e "s|dir: reports|dir: $work/reports\n  samples_in_files: true|" \
    -e "s|local_dir: out/pr|local_dir: $work/pr|" \
    configs/tiny.yaml > "$work/rlhf.yaml"
cp configs/principles.yaml "$work/principles.yaml"
# A stand-in judge on loopback (an OpenAI-compatible /chat/completions): the tiny policy from
# scratch cannot critique or revise, so this one answers with fixed text, its revision following
# what the principle asks. A real deployment points `constitution.judge` at a real model.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 - "$port" <<'EOF' &
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Judge(BaseHTTPRequestHandler):
    def do_POST(self):
        ask = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        if "Rewrite" not in ask:
            reply = "The answer does not say what the user asked about, and it is hard to follow."
        elif "three sentences" in ask:
            reply = "Economists expect a modest effect. The size depends on the policy. Sources differ."
        else:
            reply = "Economists expect a modest effect, which depends on how the policy is designed."
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Judge).serve_forever()
EOF
judge=$!
trap 'kill $judge 2>/dev/null; rm -rf "$work"' EXIT
printf 'evals:\n  dir: configs/evals\nconstitution:\n  principles: %s\n  critic: judge\n  limit: 4\n  max_new_tokens: 24\n  judge:\n    url: http://127.0.0.1:%s/v1\n    model: stand-in\n' \
    "$work/principles.yaml" "$port" >> "$work/rlhf.yaml"
sleep 1
# The last training saw the bundled sample only; the flood arrives after it.
cp configs/sample-feedback.jsonl "$work/feedback.jsonl"
RLHF_BOT_NOW=2026-11-26T12:00:00Z "$bin" --config "$work/rlhf.yaml" run --force >/dev/null
RLHF_BOT_NOW=2026-11-26T13:00:00Z "$bin" --config "$work/rlhf.yaml" constitution >/dev/null
# The team edits its principles in a pull request: every revision now asks for brevity.
sed -i 's|Reply with the rewritten answer only.|Reply with the rewritten answer only, in at most three sentences.|' \
    "$work/principles.yaml"
RLHF_BOT_NOW=2026-11-27T11:00:00Z "$bin" --config "$work/rlhf.yaml" constitution >/dev/null
rm -rf "$work/reports"
cp "$work/flooded.jsonl" "$work/feedback.jsonl"
RLHF_BOT_NOW=2026-11-27T12:00:00Z "$bin" --config "$work/rlhf.yaml" run --force >/dev/null
dir=$(dirname "$(ls "$work"/reports/*/report.md)")
rm -rf docs/sample-report && mkdir -p docs/sample-report
cp "$dir"/* docs/sample-report/
{
    echo "<!-- Generated by scripts/sample-report.sh: the bundled sample feedback plus a seeded flood,"
    echo "     edited principles, tiny models from scratch (so the numbers and answers say nothing"
    echo "     about quality). -->"
    cat "$dir/report.md"
} > docs/sample-report/report.md
echo "wrote docs/sample-report/"
