// <rlhf-feedback>: the feedback collection widget, served by `rlhf-bot serve` at /widget.js.
// One ES module, no framework, no build step. A chat page adds, under each answer:
//
//   <script type="module" src="https://feedback.example.com/widget.js"></script>
//   <rlhf-feedback endpoint="https://feedback.example.com" key="<public widget key>"
//     conversation-id="c_1" message-id="m_1" model-version="policy-20261201-101500"
//     prompt="What is carbon leakage?" response="Carbon leakage happens when ..."
//     steps='["First step.", "Second step."]' aspects="accuracy,helpfulness"></rlhf-feedback>
//
// Every choice is one record with a stable id (message id + what it is about), so changing your
// mind sends an edit of the same record with a later `updated_at`. Sends that fail are kept in
// localStorage and retried (with backoff, and when the browser comes back online), so feedback
// given offline is not lost. docs/feedback-service.md describes the contract.

const QUEUE_KEY = "rlhf-feedback-queue";
const STYLE = `
  :host { display: block; color-scheme: light dark; font: inherit; color: inherit; margin: .5em 0; }
  .row { display: flex; flex-wrap: wrap; align-items: center; gap: .35em; margin: .25em 0; }
  .label { min-width: 7em; opacity: .85; }
  button { font: inherit; color: inherit; background: transparent; border: 1px solid currentColor;
           border-radius: .4em; padding: .1em .55em; cursor: pointer; opacity: .75; }
  button[aria-pressed="true"], button[aria-checked="true"] { opacity: 1; font-weight: bold;
           background: color-mix(in srgb, currentColor 18%, transparent); }
  button:focus-visible, textarea:focus-visible { outline: 2px solid Highlight; outline-offset: 2px; }
  textarea { font: inherit; color: inherit; background: transparent; width: 100%; min-height: 3em;
             border: 1px solid currentColor; border-radius: .4em; box-sizing: border-box; }
  .status { font-size: .85em; opacity: .8; min-height: 1.2em; }
  .step { margin-left: 1em; }
`;

function readQueue() {
  try { return JSON.parse(localStorage.getItem(QUEUE_KEY) || "{}"); } catch { return {}; }
}
function writeQueue(queue) {
  try { localStorage.setItem(QUEUE_KEY, JSON.stringify(queue)); } catch { /* storage full or off */ }
}

// One queue per page, shared by every widget on it: records by id, only the newest version kept.
const outbox = {
  timer: null,
  delay: 1000,
  put(endpoint, key, record) {
    const queue = readQueue();
    queue[record.id] = { endpoint, key, record };
    writeQueue(queue);
    this.flush();
  },
  async flush() {
    clearTimeout(this.timer);
    const queue = readQueue();
    const pending = Object.values(queue);
    if (pending.length === 0) { this.delay = 1000; return; }
    let retry = false;
    for (const item of pending) {
      let outcome;
      try {
        const r = await fetch(item.endpoint.replace(/\/$/, "") + "/v1/feedback", {
          method: "POST",
          headers: { "content-type": "application/json", "x-rlhf-widget-key": item.key },
          body: JSON.stringify(item.record),
        });
        outcome = r.ok ? "sent" : (r.status === 429 || r.status >= 500) ? "retry" : "refused";
        if (outcome === "refused") {
          const body = await r.json().catch(() => ({}));
          console.warn("rlhf-feedback: refused", r.status, body.error && body.error.message);
        }
      } catch {
        outcome = "retry"; // offline, or the service is unreachable
      }
      const now = readQueue();
      if (outcome !== "retry" && now[item.record.id]
          && now[item.record.id].record.updated_at === item.record.updated_at) {
        delete now[item.record.id];
        writeQueue(now);
      }
      document.dispatchEvent(new CustomEvent("rlhf-feedback-sent",
        { detail: { id: item.record.id, outcome } }));
      if (outcome === "retry") retry = true;
    }
    if (retry) {
      this.timer = setTimeout(() => this.flush(), this.delay);
      this.delay = Math.min(this.delay * 2, 60000);
    } else {
      this.delay = 1000;
    }
  },
};
window.addEventListener("online", () => outbox.flush());
// Feedback queued by an earlier visit (closed tab, reload while offline) goes out on load.
outbox.flush();

class RlhfFeedback extends HTMLElement {
  constructor() {
    super();
    this.state = { thumb: null, rating: null, steps: {}, aspects: {}, comment: "" };
    this.attachShadow({ mode: "open" });
  }

  connectedCallback() {
    this.render();
    document.addEventListener("rlhf-feedback-sent", (e) => {
      if (e.detail.id.startsWith(this.messageId + ":")) {
        this.status(e.detail.outcome === "sent" ? "Thanks, sent."
          : e.detail.outcome === "retry" ? "Saved; will send when the service is reachable."
          : "The service refused this feedback.");
      }
    });
    outbox.flush();
  }

  get messageId() { return this.getAttribute("message-id") || ""; }

  list(name) {
    const raw = this.getAttribute(name);
    if (!raw) return [];
    try { const v = JSON.parse(raw); return Array.isArray(v) ? v.map(String) : []; }
    catch { return raw.split(",").map((s) => s.trim()).filter(Boolean); }
  }

  record(suffix, kind, fields) {
    const base = {
      id: `${this.messageId}:${suffix}`,
      kind,
      conversation_id: this.getAttribute("conversation-id") || "",
      message_id: this.messageId,
      model_version: this.getAttribute("model-version") || "",
      prompt: [{ role: "user", content: this.getAttribute("prompt") || "" }],
      response: { content: this.getAttribute("response") || "", steps: this.list("steps") },
      updated_at: new Date().toISOString(),
      ...fields,
    };
    if (this.getAttribute("user-id")) base.user_id = this.getAttribute("user-id");
    if (this.state.comment && (kind === "thumb" || kind === "rating")) base.comment = this.state.comment;
    if (base.response.steps.length === 0) delete base.response.steps;
    return base;
  }

  send(record) {
    outbox.put(this.getAttribute("endpoint") || location.origin, this.getAttribute("key") || "", record);
  }

  status(text) {
    const el = this.shadowRoot.querySelector(".status");
    if (el) el.textContent = text;
  }

  button(label, aria, pressedAttr, pressed, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.setAttribute("aria-label", aria);
    b.setAttribute(pressedAttr, String(pressed));
    b.addEventListener("click", onClick);
    return b;
  }

  row(label) {
    const row = document.createElement("div");
    row.className = "row";
    const l = document.createElement("span");
    l.className = "label";
    l.textContent = label;
    row.append(l);
    return row;
  }

  render() {
    const root = this.shadowRoot;
    // Re-rendering replaces the buttons: keep keyboard focus on the control that had it.
    const focused = root.activeElement && root.activeElement.getAttribute("aria-label");
    root.innerHTML = "";
    const style = document.createElement("style");
    style.textContent = STYLE;
    const box = document.createElement("div");
    box.setAttribute("role", "group");
    box.setAttribute("aria-label", "Feedback on this answer");
    const s = this.state;

    const thumbs = this.row("This answer");
    for (const [value, label] of [["up", "▲"], ["down", "▼"]]) {
      thumbs.append(this.button(label, `Thumb ${value} for this answer`, "aria-pressed", s.thumb === value, () => {
        s.thumb = value;
        this.send(this.record("thumb", "thumb", { thumb: value }));
        this.render();
      }));
    }
    box.append(thumbs);

    this.list("steps").forEach((text, i) => {
      const row = this.row(`Step ${i + 1}`);
      row.classList.add("step");
      row.title = text;
      for (const [value, label] of [["up", "▲"], ["down", "▼"]]) {
        row.append(this.button(label, `Thumb ${value} for step ${i + 1}: ${text}`, "aria-pressed", s.steps[i] === value, () => {
          s.steps[i] = value;
          this.send(this.record(`step:${i}`, "step", { step_index: i, thumb: value }));
          this.render();
        }));
      }
      box.append(row);
    });

    const rating = this.row("Rating");
    rating.setAttribute("role", "radiogroup");
    rating.setAttribute("aria-label", "Rate this answer from 1 to 5");
    for (let n = 1; n <= 5; n++) {
      const b = this.button(String(n), `Rate ${n} of 5`, "aria-checked", s.rating === n, () => {
        s.rating = n;
        this.send(this.record("rating", "rating", { rating: n }));
        this.render();
      });
      b.setAttribute("role", "radio");
      rating.append(b);
    }
    box.append(rating);

    for (const aspect of this.list("aspects").length ? this.list("aspects") : ["accuracy", "helpfulness"]) {
      const row = this.row(aspect[0].toUpperCase() + aspect.slice(1));
      row.setAttribute("role", "radiogroup");
      row.setAttribute("aria-label", `Rate the ${aspect} of this answer from 1 to 5`);
      for (let n = 1; n <= 5; n++) {
        const b = this.button(String(n), `Rate ${aspect} ${n} of 5`, "aria-checked", s.aspects[aspect] === n, () => {
          s.aspects[aspect] = n;
          this.send(this.record(`aspect:${aspect}`, "aspect", { aspect, rating: n }));
          this.render();
        });
        b.setAttribute("role", "radio");
        row.append(b);
      }
      box.append(row);
    }

    const comment = document.createElement("textarea");
    comment.setAttribute("aria-label", "Optional comment on this answer");
    comment.placeholder = "Optional comment";
    comment.value = s.comment;
    comment.addEventListener("input", () => { s.comment = comment.value; });
    const send = this.button("Send comment", "Send the comment with your thumb or rating", "aria-pressed", false, () => {
      if (s.thumb) this.send(this.record("thumb", "thumb", { thumb: s.thumb }));
      if (s.rating) this.send(this.record("rating", "rating", { rating: s.rating }));
      if (!s.thumb && !s.rating) this.status("Give a thumb or a rating first; the comment goes with it.");
    });
    send.removeAttribute("aria-pressed");
    const status = document.createElement("div");
    status.className = "status";
    status.setAttribute("role", "status");
    status.setAttribute("aria-live", "polite");
    box.append(comment, send, status);
    root.append(style, box);
    if (focused) {
      const again = [...root.querySelectorAll("[aria-label]")]
        .find((el) => el.getAttribute("aria-label") === focused);
      if (again) again.focus();
    }
  }
}

if (!customElements.get("rlhf-feedback")) customElements.define("rlhf-feedback", RlhfFeedback);
