//! The run-output contract, gate evaluation, neutralisation and the rendered report (snapshots).

use std::collections::BTreeMap;
use std::fs;

use chrono::{TimeZone, Utc};
use rlhf_bot::registry::{ModelKind, ModelStatus, PRODUCTION};
use rlhf_bot::report::{
    self, GateConfig, GateStatus, Interval, KpiRow, LocalPaths, PR_BODY_LIMIT, PolicySection,
    RenderOptions, ReportContext, ReportError, RewardSection, evaluate_gates, verdict,
};
use rlhf_bot::run::outputs::{
    DatasetInfo, LogLine, PolicyAlgo, PolicyEval, PolicyMetrics, PolicyRunOutput, PolicySample,
    RewardEval, RewardMetrics, RewardRunOutput, RunOutputError, TrainStats, keys, read_log,
};

use crate::registry::entry;

/// Renders as a config with `report.samples_in_files: true` would, the artifacts directory
/// `/srv/models` shown as `<artifacts>`: what the snapshots below pin.
fn render_all(ctx: &ReportContext) -> Result<report::Rendered, ReportError> {
    report::render_with(
        ctx,
        &RenderOptions {
            samples_in_files: true,
            local_paths: LocalPaths::default().with_root("/srv/models", "<artifacts>"),
            ..RenderOptions::default()
        },
    )
}

fn snap(name: &str, value: &str) {
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, value);
    });
}

fn reward_eval(accuracy: f64) -> RewardEval {
    RewardEval {
        accuracy,
        loss: 0.61,
        n: 400,
        mean_margin: 0.42,
        aspect_errors: BTreeMap::from([("accuracy".into(), 0.31), ("helpfulness".into(), 0.28)]),
        step_accuracy: Some(0.7),
        ..RewardEval::default()
    }
}

fn train(steps: u64) -> TrainStats {
    TrainStats {
        steps,
        seconds: 312.5,
        examples_per_second: 24.6,
        tokens_per_second: 6120.0,
        epochs: 2.0,
        precision: None,
    }
}

fn reward_metrics(accuracy: f64, production: Option<f64>) -> RewardMetrics {
    RewardMetrics {
        eval: reward_eval(accuracy),
        train: train(240),
        dataset: DatasetInfo {
            counts: BTreeMap::from([("pairs".into(), 1_600), ("steps".into(), 90)]),
            examples_sha256: "e".repeat(64),
        },
        production_eval: production.map(|a| {
            let mut e = reward_eval(a);
            e.mean_margin = 0.35;
            e.aspect_errors.insert("accuracy".into(), 0.33);
            e.step_accuracy = Some(0.66);
            e
        }),
    }
}

fn reward_log() -> Vec<LogLine> {
    (1..=60u64)
        .map(|s| {
            let t = s as f64;
            LogLine::new(s)
                .with(keys::LOSS, 0.69 * (-t / 40.0).exp() + 0.3)
                .with(keys::ACCURACY, 0.5 + 0.15 * (1.0 - (-t / 20.0).exp()))
                .with(keys::LEARNING_RATE, 1e-4)
        })
        .collect()
}

fn policy_log() -> Vec<LogLine> {
    (1..=40u64)
        .map(|s| {
            let t = s as f64;
            LogLine::new(s)
                .with(keys::KL, 0.05 * t)
                .with(keys::RLHF_REWARD, 0.2 + 0.02 * t)
                .with(keys::POLICY_LOSS, -0.01 * t)
                .with(keys::ENTROPY, 2.0)
        })
        .collect()
}

fn samples(production: bool) -> Vec<PolicySample> {
    let p = |s: &str| production.then(|| s.to_string());
    vec![
        PolicySample {
            prompt: "What is a carbon tax, in one sentence?".into(),
            candidate:
                "A carbon tax puts a price on each tonne of CO2 emitted, so polluting costs more."
                    .into(),
            production: p("It is a tax."),
            candidate_reward: 1.234,
            production_reward: production.then_some(-0.25),
        },
        PolicySample {
            prompt: "Compare cap-and-trade with a carbon tax.\nKeep it short.".into(),
            candidate:
                "Cap-and-trade fixes the quantity and lets the price move;\na tax fixes the price."
                    .into(),
            production: p("Both are the same."),
            candidate_reward: 0.8,
            production_reward: production.then_some(0.1),
        },
    ]
}

fn policy_metrics(win: (f64, f64, f64), kl: f64, production: bool) -> PolicyMetrics {
    PolicyMetrics {
        algo: PolicyAlgo::Ppo,
        eval: PolicyEval {
            win_rate: win.0,
            win_rate_low: win.1,
            win_rate_high: win.2,
            n: 300,
            mean_reward: 0.91,
            production_mean_reward: production.then_some(0.55),
            kl,
            response_length: 87.5,
            production_response_length: production.then_some(64.0),
            samples: samples(production),
            reward_components: Vec::new(),
            step_score: None,
            production_step_score: None,
        },
        train: train(120),
        last_step: Default::default(),
    }
}

fn context(production: bool, win: (f64, f64, f64), kl: f64) -> ReportContext {
    let mut rm = entry(
        "rm-20261127-a1b2c3",
        ModelKind::Reward,
        27,
        production.then_some("rm-20261101-000000"),
    );
    rm.metrics = reward_metrics(0.652, None).registry_metrics();
    let mut pol = entry(
        "pol-20261127-d4e5f6",
        ModelKind::Policy,
        27,
        production.then_some("pol-20261101-000000"),
    );
    pol.algorithm = "ppo".into();
    let prod = |id: &str, kind| {
        let mut e = entry(id, kind, 1, None);
        e.status = ModelStatus::Production;
        e.aliases = vec![PRODUCTION.into()];
        e
    };
    ReportContext {
        run_id: "20261127-0630-7".into(),
        generated_at: Utc.with_ymd_and_hms(2026, 11, 27, 7, 45, 0).unwrap(),
        repository: Some("acme/assistant".into()),
        run_url: Some("https://github.com/acme/assistant/actions/runs/7".into()),
        report_url: Some(
            "https://github.com/acme/assistant/blob/rlhf-bot/20261127-0630-7/reports/20261127-0630-7/report.md".into(),
        ),
        new_feedback: BTreeMap::from([("thumbs".into(), 812), ("ratings".into(), 301), ("steps".into(), 44)]),
        reward: Some(RewardSection {
            candidate: rm,
            production: production.then(|| prod("rm-20261101-000000", ModelKind::Reward)),
            baseline: None,
            metrics: reward_metrics(0.652, production.then_some(0.648)),
            log: reward_log(),
        }),
        policy: Some(PolicySection {
            candidate: pol,
            production: production.then(|| prod("pol-20261101-000000", ModelKind::Policy)),
            baseline: None,
            metrics: policy_metrics(win, kl, production),
            log: policy_log(),
        }),
        kpis: vec![
            KpiRow {
                model_version: "pol-20261101-000000".into(),
                count: 1_157,
                positive_rate: Some(Interval { estimate: 0.71, low: 0.68, high: 0.74 }),
                mean_rating: Some(Interval { estimate: 4.02, low: 3.95, high: 4.09 }),
            },
            KpiRow { model_version: "base".into(), count: 12, positive_rate: None, mean_rating: None },
        ],
        gates: GateConfig { rm_accuracy_max_drop_points: 1.0, min_win_rate_lower_bound: 0.5, kl_budget: 6.0 },
        reproduce: "rlhf-bot run --config .github/rlhf-bot.yaml --watermark 2026-11-27T06:00:00Z".into(),
        max_samples: 3,
        rejections: Vec::new(),
        deployed: Vec::new(),
        integrity: None,
        evals: None,
        constitution: None,
        ai_feedback: None,
    }
}

pub fn passing() -> ReportContext {
    context(true, (0.58, 0.532, 0.627), 2.1)
}

// ---------------------------------------------------------------------------------------------
// Snapshots of the rendered report.

#[test]
fn snapshot_all_gates_pass() {
    let r = render_all(&passing()).unwrap();
    assert!(r.markdown.contains("All 3 checked gates passed"));
    snap("report_all_pass", &r.markdown);
    snap("pr_body_all_pass", &r.pr_body);
}

/// What `deploy` published (issue 16) is listed, neutralised like every other value.
#[test]
fn the_live_models_are_listed() {
    let mut ctx = passing();
    ctx.deployed = vec![
        report::Deployment {
            kind: "policy".into(),
            id: "pol-20261101-000000".into(),
            deployed_at: "2026-11-02T08:00:00Z".into(),
            notified: Some(false),
        },
        report::Deployment {
            kind: "reward".into(),
            id: "@acme/x <b>".into(),
            deployed_at: "2026-11-02T08:00:00Z".into(),
            notified: Some(true),
        },
    ];
    let r = render_all(&ctx).unwrap();
    for doc in [&r.markdown, &r.pr_body] {
        assert!(doc.contains("### Live in serving"), "{doc}");
        assert!(
            doc.contains(
                "policy `pol-20261101-000000` since 2026-11-02T08:00:00Z, serving not told yet"
            ),
            "{doc}"
        );
        assert!(!doc.contains("<b>") && !doc.contains(" @acme/x"), "{doc}");
    }
    // Without deployments the section is absent (the snapshots above hold that).
    assert!(
        !render_all(&passing())
            .unwrap()
            .markdown
            .contains("Live in serving")
    );
}

#[test]
fn snapshot_a_gate_fails() {
    let ctx = context(true, (0.49, 0.47, 0.55), 7.5);
    let r = render_all(&ctx).unwrap();
    assert!(
        r.pr_body.contains("❌ **2 of 3 gates failed"),
        "{}",
        r.pr_body
    );
    snap("pr_body_gate_fails", &r.pr_body);
}

#[test]
fn snapshot_first_run_without_production() {
    let ctx = context(false, (0.61, 0.552, 0.665), 1.4);
    let r = render_all(&ctx).unwrap();
    assert!(
        r.markdown
            .contains("no production reward model or policy yet")
    );
    assert!(r.markdown.contains("vs base model"));
    snap("report_first_run", &r.markdown);
}

/// Removes fenced code blocks, where GitHub renders nothing active; what is left must be inert.
fn outside_fences(md: &str) -> String {
    let mut out = String::new();
    let mut fence: Option<String> = None;
    for line in md.lines() {
        let ticks: String = line.chars().take_while(|&c| c == '`').collect();
        match &fence {
            None if ticks.len() >= 3 => fence = Some(ticks),
            Some(f) if ticks.len() >= f.len() && line.trim() == ticks => fence = None,
            None => {
                out.push_str(line);
                out.push('\n');
            }
            Some(_) => {}
        }
    }
    assert!(fence.is_none(), "a code fence was left open");
    out
}

#[test]
fn snapshot_hostile_text_is_neutralised() {
    let mut ctx = passing();
    let hostile = format!(
        "hey @octocat and @acme/maintainers see #1 <img src=x onerror=alert(1)> ![pixel](https://evil.example/p.png)\n```\n# injected heading\n[click](javascript:alert(1))\n{}",
        "A".repeat(100 * 1024)
    );
    let policy = ctx.policy.as_mut().unwrap();
    policy.metrics.eval.samples = vec![PolicySample {
        prompt: hostile.clone(),
        candidate: hostile.clone(),
        production: Some(format!("\u{202E}reversed `` ``` `````` {hostile}")),
        candidate_reward: 0.0,
        production_reward: Some(0.0),
    }];
    ctx.kpis[0].model_version = "@acme/maintainers <b>x</b>".into();
    ctx.new_feedback.insert("<script>".into(), 1);
    let r = render_all(&ctx).unwrap();
    for doc in [&r.markdown, &r.pr_body] {
        let active = outside_fences(doc);
        for bad in [
            "@octocat",
            "@acme",
            "<img",
            "<script",
            "<b>",
            "![pixel]",
            "[click]",
            "\n# injected",
            "#1 ",
        ] {
            assert!(
                !active.contains(bad),
                "`{bad}` survived outside code fences"
            );
        }
        assert!(!doc.contains('\u{202E}'));
        assert!(
            doc.len() < 40_000,
            "100 KB of model text must be truncated, got {}",
            doc.len()
        );
    }
    assert!(r.markdown.contains("[truncated: "));
    // Cut the 100 KB filler out of the snapshot; the neutralised head and the fences are the point.
    let compact: String = r.markdown.replace(&"A".repeat(200), "");
    let start = compact.find("## Sample answers").unwrap();
    let end = compact.find("## Lineage").unwrap();
    snap("report_hostile_samples", &compact[start..end]);
}

#[test]
fn pr_body_over_the_limit_is_cut_with_a_link() {
    let mut ctx = passing();
    ctx.max_samples = 500;
    let policy = ctx.policy.as_mut().unwrap();
    policy.metrics.eval.samples = (0..200)
        .map(|i| PolicySample {
            prompt: format!("prompt {i}: {}", "why? ".repeat(300)),
            candidate: format!("answer {i}: {}", "because. ".repeat(100)),
            production: Some("no".into()),
            candidate_reward: 0.5,
            production_reward: Some(0.1),
        })
        .collect();
    let r = render_all(&ctx).unwrap();
    assert!(r.pr_body.len() <= PR_BODY_LIMIT, "{}", r.pr_body.len());
    assert!(
        r.pr_body.len() > PR_BODY_LIMIT - 4_000,
        "cut far too early: {}",
        r.pr_body.len()
    );
    assert!(
        r.pr_body.contains("All 3 checked gates passed"),
        "the summary must survive the cut"
    );
    outside_fences(&r.pr_body);
    assert_eq!(
        r.pr_body.matches("<details>").count(),
        r.pr_body.matches("</details>").count()
    );
    let tail = &r.pr_body[r.pr_body.len() - 400..];
    assert!(tail.contains("reports/20261127-0630-7/report.md"));
    snap(
        "pr_body_cut_tail",
        tail.split_once('\n').map_or(tail, |(_, rest)| rest),
    );
    // The full report is not cut.
    assert!(r.markdown.len() > PR_BODY_LIMIT);
}

#[test]
fn rendering_is_deterministic_and_writes_its_files() {
    let ctx = passing();
    let a = render_all(&ctx).unwrap();
    assert_eq!(a, render_all(&ctx).unwrap());
    let names: Vec<&str> = a.plots.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "reward-loss.svg",
            "reward-accuracy.svg",
            "policy-reward.svg",
            "policy-kl.svg",
            "policy-loss.svg"
        ]
    );
    for (name, svg) in &a.plots {
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{name}"
        );
        assert!(
            a.markdown.contains(&format!("]({name})")),
            "{name} not linked"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = report::write_report(dir.path(), &ctx.run_id, &a).unwrap();
    assert_eq!(out, dir.path().join("20261127-0630-7"));
    assert_eq!(
        fs::read_to_string(out.join("report.md")).unwrap(),
        a.markdown
    );
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(json["verdict"]["passed"], true);
    assert_eq!(json["gates"].as_array().unwrap().len(), 3);
    assert!(out.join("policy-kl.svg").is_file());
    assert!(matches!(
        report::write_report(dir.path(), "../x", &a),
        Err(ReportError::BadRunId(_))
    ));
}

#[test]
fn templates_can_be_overridden_and_are_strict() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("pr_body.md.j2"),
        "{{ view.verdict.icon }} custom {{ view.report_path }}\n",
    )
    .unwrap();
    let opts = RenderOptions {
        template_dir: Some(dir.path().to_path_buf()),
        ..RenderOptions::default()
    };
    let r = report::render_with(&passing(), &opts).unwrap();
    assert_eq!(r.pr_body, "✅ custom reports/20261127-0630-7/report.md\n");
    assert!(
        r.markdown.starts_with("# rlhf-bot report"),
        "other templates stay embedded"
    );

    fs::write(
        dir.path().join("pr_body.md.j2"),
        "{{ view.no_such_field }}\n",
    )
    .unwrap();
    let err = report::render_with(&passing(), &opts).unwrap_err();
    assert!(
        matches!(&err, ReportError::Template { name, .. } if name == "pr_body.md.j2"),
        "{err}"
    );
}

#[test]
fn no_training_at_all_still_renders() {
    let mut ctx = passing();
    ctx.reward = None;
    ctx.policy = None;
    ctx.kpis.clear();
    let r = render_all(&ctx).unwrap();
    assert!(r.pr_body.contains("Nothing was trained"));
    assert!(r.pr_body.contains("No gate could be checked"));
    assert!(r.plots.is_empty());
}

#[test]
fn by_default_committed_files_hold_no_samples_and_no_local_paths() {
    let ctx = passing();
    let r = report::render(&ctx).unwrap();
    let prompt = "What is a carbon tax, in one sentence?";
    let answer = "puts a price on each tonne";
    for (name, text) in [
        ("report.md", &r.markdown),
        ("metrics.json", &r.metrics_json),
    ] {
        for leak in [prompt, answer, "Keep it short", "/srv/models", "file://"] {
            assert!(!text.contains(leak), "{name} holds {leak:?}");
        }
    }
    assert!(
        r.markdown
            .contains("Kept out of the committed files: prompts come from users"),
        "{}",
        r.markdown
    );
    assert!(r.markdown.contains("`<local>/rm-20261127-a1b2c3/`"));
    // The PR body, which a reviewer can edit, still shows them; so does an opted-in report.
    assert!(r.pr_body.contains(prompt) && r.pr_body.contains(answer));
    let all = render_all(&ctx).unwrap();
    assert!(all.markdown.contains(prompt) && all.metrics_json.contains(prompt));
}

// ---------------------------------------------------------------------------------------------
// Gates: a pure function.

#[test]
fn gate_boundaries() {
    let cfg = GateConfig {
        rm_accuracy_max_drop_points: 1.0,
        min_win_rate_lower_bound: 0.5,
        kl_budget: 6.0,
    };
    // Exactly one point below production passes; a hair more fails.
    let at = reward_metrics(0.63, Some(0.64));
    let below = reward_metrics(0.6299, Some(0.64));
    assert_eq!(
        evaluate_gates(&cfg, Some(&at), None)[0].status,
        GateStatus::Pass
    );
    assert_eq!(
        evaluate_gates(&cfg, Some(&below), None)[0].status,
        GateStatus::Fail
    );
    // A lower bound of exactly 50% is not "> 50%"; KL exactly at budget is within it.
    let p = policy_metrics((0.55, 0.5, 0.6), 6.0, true);
    let g = evaluate_gates(&cfg, None, Some(&p));
    assert_eq!(g[1].status, GateStatus::Fail);
    assert_eq!(g[2].status, GateStatus::Pass);
    // NaN never passes.
    let nan = policy_metrics((f64::NAN, f64::NAN, f64::NAN), f64::NAN, true);
    let g = evaluate_gates(&cfg, None, Some(&nan));
    assert_eq!(
        (g[1].status, g[2].status),
        (GateStatus::Fail, GateStatus::Fail)
    );
}

#[test]
fn gates_not_applicable_are_skipped_not_failed() {
    let cfg = GateConfig::default();
    let first = reward_metrics(0.6, None);
    let g = evaluate_gates(&cfg, Some(&first), None);
    assert!(g.iter().all(|r| r.status == GateStatus::Skipped));
    let v = verdict(&g);
    assert!(v.passed && v.checked == 0 && v.skipped == 3);
    let g = evaluate_gates(&cfg, Some(&reward_metrics(0.5, Some(0.7))), None);
    let v = verdict(&g);
    assert!(!v.passed && v.failed == 1 && v.checked == 1);
    assert_eq!(g[0].detail, "50.0% < 69.0% (production 70.0% − 1.0 pt)");
}

#[test]
fn gate_config_reads_from_yaml_with_defaults() {
    let cfg: GateConfig = serde_norway::from_str("kl_budget: 4.5\n").unwrap();
    assert_eq!(
        cfg,
        GateConfig {
            kl_budget: 4.5,
            ..GateConfig::default()
        }
    );
    assert!(serde_norway::from_str::<GateConfig>("kl_budjet: 4.5\n").is_err());
}

// ---------------------------------------------------------------------------------------------
// The run-output contract.

/// serde_json's default float parser may be one ulp off (exact parsing is its `float_roundtrip`
/// feature, which we do not enable); curves need no more.
fn assert_logs_close(a: &[LogLine], b: &[LogLine]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.step, y.step);
        assert_eq!(
            x.values.keys().collect::<Vec<_>>(),
            y.values.keys().collect::<Vec<_>>()
        );
        for (k, v) in &x.values {
            assert!(
                (v - y.values[k]).abs() <= 1e-12 * v.abs().max(1.0),
                "{k} at step {}",
                x.step
            );
        }
    }
}

fn back_reward_snapshot(m: &RewardMetrics) -> rlhf_bot::registry::FeedbackSnapshot {
    let snap = m.dataset.snapshot("wm-7");
    assert_eq!(snap.watermark, "wm-7");
    assert_eq!(snap.examples_sha256, m.dataset.examples_sha256);
    snap
}

#[test]
fn run_outputs_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let reward = RewardRunOutput {
        metrics: reward_metrics(0.652, Some(0.648)),
        log: reward_log(),
    };
    reward.write(&dir.path().join("rm")).unwrap();
    let back = RewardRunOutput::load(&dir.path().join("rm")).unwrap();
    assert_eq!(back.metrics, reward.metrics);
    assert_logs_close(&back.log, &reward.log);
    let policy = PolicyRunOutput {
        metrics: policy_metrics((0.6, 0.55, 0.65), 1.0, false),
        log: policy_log(),
    };
    policy.write(&dir.path().join("pol")).unwrap();
    let back = PolicyRunOutput::load(&dir.path().join("pol")).unwrap();
    assert_eq!(back.metrics, policy.metrics);
    assert_logs_close(&back.log, &policy.log);
    let snap = back_reward_snapshot(&reward.metrics);
    assert_eq!(snap.counts["pairs"], 1_600);
    let text = fs::read_to_string(dir.path().join("pol/metrics.json")).unwrap();
    assert!(text.contains("\"algo\": \"ppo\"") && !text.contains("production_mean_reward"));
    let first = fs::read_to_string(dir.path().join("pol/log.jsonl")).unwrap();
    assert!(
        first
            .lines()
            .next()
            .unwrap()
            .contains("\"objective/kl\":0.05")
    );
}

#[test]
fn log_lines_tolerate_extra_keys_and_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("log.jsonl"),
        "{\"step\":1,\"loss\":0.7,\"phase\":\"train\",\"grad\":null,\"nested\":{\"a\":1}}\n\n{\"step\":2,\"loss\":0.6}\n{\"step\":3,\"lo",
    )
    .unwrap();
    let log = read_log(dir.path()).unwrap();
    assert_eq!(
        log,
        vec![
            LogLine::new(1).with("loss", 0.7),
            LogLine::new(2).with("loss", 0.6)
        ]
    );

    fs::write(
        dir.path().join("log.jsonl"),
        "{\"step\":1}\n{\"loss\":0.6}\n{\"step\":3}\n",
    )
    .unwrap();
    let err = read_log(dir.path()).unwrap_err();
    assert!(
        matches!(&err, RunOutputError::Line { line: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("log.jsonl:2"), "{err}");
}

#[test]
fn metrics_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let err = RewardRunOutput::load(dir.path()).unwrap_err();
    assert!(matches!(err, RunOutputError::Missing { .. }), "{err}");
    let mut value = serde_json::to_value(reward_metrics(0.6, None)).unwrap();
    value["eval"]["accuracy"] = serde_json::json!("high");
    value["unknown_extra"] = serde_json::json!(1);
    fs::write(dir.path().join("metrics.json"), value.to_string()).unwrap();
    let err = rlhf_bot::run::outputs::read_metrics::<RewardMetrics>(dir.path()).unwrap_err();
    assert!(err.to_string().contains("eval.accuracy"), "{err}");
}
