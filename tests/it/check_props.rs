//! Properties of the retraining decision (issue #2, point 4), and `check` end to end on the
//! bundled sample, including the GitHub Actions outputs.

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use rlhf_bot::config::settings::Thresholds;
use rlhf_bot::decision::{DecisionInput, QualityWindows, decide};
use rlhf_bot::feedback::store::VersionCounts;

use rlhf_bot::registry::{ModelKind, Registry};

use crate::common::{Workspace, bin, run, stderr, stdout};
use crate::registry::entry;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn counts(thumbs: u64, up: u64, ratings: u64, mean: f64) -> VersionCounts {
    VersionCounts {
        model_version: "policy-v2".into(),
        records: thumbs + ratings,
        thumbs,
        thumbs_up: up.min(thumbs),
        ratings,
        rating_sum: mean * ratings as f64,
        rating_sq_sum: (mean * mean + 0.5) * ratings as f64,
    }
}

prop_compose! {
    fn thresholds()(n in 1u64..500, m in 1u64..500, d in 1u64..30, h in 0u64..48, conf in 0.8f64..0.999, min in 1u64..100) -> Thresholds {
        let mut t = Thresholds { min_new_feedback: n, min_new_signals: m, max_age_days: d, min_hours_between: h.min(d * 24), ..Default::default() };
        t.quality.confidence = conf;
        t.quality.min_samples = min;
        t
    }
}

prop_compose! {
    fn input()(feedback in 0u64..2000, signals in 0u64..2000, hours_ago in proptest::option::of(0i64..2000), force in any::<bool>(),
               bt in 0u64..500, bu in 0u64..500, rt in 0u64..500, ru in 0u64..500) -> DecisionInput {
        DecisionInput {
            now: now(),
            new_feedback: feedback,
            new_signals: signals.min(feedback),
            last_training_at: hours_ago.map(|h| now() - Duration::hours(h)),
            quality: Some(QualityWindows { production_version: "policy-v2".into(), baseline: counts(bt, bu, bt / 2, 3.5), recent: counts(rt, ru, rt / 2, 3.0), held_out: 0 }),
            force,
            rejected_same_data: None, principles: None,
        }
    }
}

proptest! {
    #[test]
    fn more_feedback_never_turns_the_volume_trigger_off(t in thresholds(), i in input(), extra in 0u64..1000, extra_signals in 0u64..1000) {
        let before = decide(&i, &t);
        let more = DecisionInput { new_feedback: i.new_feedback + extra + extra_signals, new_signals: i.new_signals + extra_signals, ..i.clone() };
        let after = decide(&more, &t);
        if before.trigger("volume").unwrap().fired {
            prop_assert!(after.trigger("volume").unwrap().fired);
        }
        if before.retrain {
            prop_assert!(after.retrain, "more feedback turned retraining off");
        }
    }

    #[test]
    fn equal_windows_never_fire_the_quality_trigger(t in thresholds(), i in input(), n in 0u64..2000, up in 0u64..2000, mean in 1.0f64..5.0) {
        let same = counts(n, up, n, mean);
        let equal = DecisionInput { quality: Some(QualityWindows { production_version: "policy-v2".into(), baseline: same.clone(), recent: same, held_out: 0 }), ..i };
        prop_assert!(!decide(&equal, &t).trigger("quality").unwrap().fired);
    }

    #[test]
    fn force_always_retrains_and_cooldown_blocks_everything_else(t in thresholds(), i in input()) {
        let d = decide(&i, &t);
        let cooling = d.trigger("cooldown").unwrap().fired;
        let any = ["volume", "age", "quality"].iter().any(|n| d.trigger(n).unwrap().fired);
        prop_assert_eq!(d.retrain, i.force || (any && !cooling));
        prop_assert!(!i.force || d.retrain);
    }

    #[test]
    fn a_better_recent_window_never_fires_the_quality_trigger(t in thresholds(), i in input(), n in 1u64..1000, up in 0u64..1000, gain in 0u64..200) {
        let base = counts(n, up.min(n), 0, 0.0);
        let better = counts(n, (up + gain).min(n), 0, 0.0);
        let q = DecisionInput { quality: Some(QualityWindows { production_version: "v".into(), baseline: base, recent: better, held_out: 0 }), ..i };
        prop_assert!(!decide(&q, &t).trigger("quality").unwrap().fired);
    }

    #[test]
    fn an_older_last_training_never_turns_the_age_trigger_off(t in thresholds(), i in input(), more_hours in 0i64..5000) {
        if let Some(at) = i.last_training_at {
            let older = DecisionInput { last_training_at: Some(at - Duration::hours(more_hours)), ..i.clone() };
            if decide(&i, &t).trigger("age").unwrap().fired {
                prop_assert!(decide(&older, &t).trigger("age").unwrap().fired);
            }
        }
    }
}

#[test]
fn a_clear_drop_fires_the_quality_trigger() {
    let t = Thresholds::default();
    let i = DecisionInput {
        now: now(),
        new_feedback: 0,
        new_signals: 0,
        last_training_at: Some(now() - Duration::days(2)),
        quality: Some(QualityWindows {
            production_version: "policy-v2".into(),
            baseline: counts(400, 320, 0, 0.0),
            recent: counts(200, 110, 0, 0.0),
            held_out: 0,
        }),
        force: false,
        rejected_same_data: None,
        principles: None,
    };
    let d = decide(&i, &t);
    assert!(d.trigger("quality").unwrap().fired, "{d:?}");
    assert!(d.retrain);
    assert_eq!(d.reasons(), "quality");
    // The same drop on a handful of answers is noise.
    let small = DecisionInput {
        quality: Some(QualityWindows {
            production_version: "policy-v2".into(),
            baseline: counts(10, 8, 0, 0.0),
            recent: counts(10, 5, 0, 0.0),
            held_out: 0,
        }),
        ..i
    };
    assert!(!decide(&small, &t).trigger("quality").unwrap().fired);
}

#[test]
fn a_rejected_proposal_on_the_same_data_blocks_retraining_unless_forced() {
    let t = Thresholds::default();
    let i = DecisionInput {
        now: now(),
        new_feedback: 5_000,
        new_signals: 5_000,
        last_training_at: Some(now() - Duration::days(30)),
        quality: None,
        force: false,
        rejected_same_data: Some("#12".into()),
        principles: None,
    };
    let d = decide(&i, &t);
    assert!(!d.retrain, "{d:?}");
    assert!(d.trigger("rejected").unwrap().detail.contains("#12"));
    assert!(
        decide(
            &DecisionInput {
                force: true,
                ..i.clone()
            },
            &t
        )
        .retrain
    );
    let fresh = DecisionInput {
        rejected_same_data: None,
        principles: None,
        ..i
    };
    assert!(decide(&fresh, &t).retrain);
    assert!(decide(&fresh, &t).trigger("rejected").is_none());
}

#[test]
fn check_reads_the_last_training_and_production_from_the_registry() {
    let ws = Workspace::new();
    let cfg = ws.sample_config();
    let check = |cfg: &std::path::Path| -> serde_json::Value {
        let out = bin()
            .env("RLHF_BOT_NOW", "2026-11-27T12:00:00Z")
            .arg("--config")
            .arg(cfg)
            .args(["--format", "json", "check"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    assert!(run(&cfg, &["pull"]).status.success());
    let before = check(&cfg);
    assert_eq!(before["history_source"], "store", "{before}");
    assert_eq!(before["last_training_at"], serde_json::Value::Null);

    // A reward model trained on the feedback up to 2026-10-20 and a production policy.
    let mut reg = Registry::default();
    let mut policy = entry("policy-v2", ModelKind::Policy, 3, None);
    policy.feedback.watermark = "2026-10-03T00:00:00Z".into();
    reg.add_candidate(policy).unwrap();
    reg.promote("policy-v2").unwrap();
    let mut rm = entry("rm-001", ModelKind::Reward, 20, None);
    rm.feedback.watermark = "2026-10-20T00:00:00Z".into();
    reg.add_candidate(rm).unwrap();
    reg.save(&ws.store_dir().join("registry.yaml")).unwrap();

    let after = check(&cfg);
    assert_eq!(after["history_source"], "registry", "{after}");
    assert_eq!(after["last_training_at"], "2026-11-20T06:30:00Z");
    assert_eq!(after["production_version"], "policy-v2");
    let (all, since) = (
        before["new_feedback"].as_u64().unwrap(),
        after["new_feedback"].as_u64().unwrap(),
    );
    assert!(
        0 < since && since < all,
        "only feedback after the registry's watermark is new: {since} of {all}"
    );

    // A registry that cannot be read is an error that names it, not a silent fallback.
    std::fs::write(ws.store_dir().join("registry.yaml"), "version: [").unwrap();
    let out = run(&cfg, &["check"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("registry.yaml"), "{}", stderr(&out));
}

#[test]
fn check_on_the_bundled_sample_writes_actions_outputs() {
    let ws = Workspace::new();
    let cfg = ws.sample_config();
    let output = ws.path().join("gh-output");
    let summary = ws.path().join("gh-summary.md");
    let out = bin()
        .env("GITHUB_OUTPUT", &output)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("RLHF_BOT_NOW", "2026-11-27T12:00:00Z")
        .arg("--config")
        .arg(&cfg)
        .args(["--format", "json", "run"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["pull"]["quarantined"], 4, "{json}");
    assert_eq!(json["check"]["retrain"], true);
    assert!(
        json["check"]["reasons"]
            .as_str()
            .unwrap()
            .contains("volume")
    );
    let kpis = json["check"]["kpis"].as_array().unwrap();
    assert_eq!(kpis.len(), 2, "two model versions in the sample");
    assert!(
        kpis.iter()
            .all(|k| k["positive_rate"]["low"].as_f64() < k["positive_rate"]["high"].as_f64())
    );
    let outputs = std::fs::read_to_string(&output).unwrap();
    assert!(
        outputs.contains("retrain=true\n") && outputs.contains("reasons=volume"),
        "{outputs}"
    );
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(md.contains("| volume | yes |"), "{md}");
}

#[test]
fn the_principles_trigger_fires_only_on_a_change_and_waits_out_the_cooldown() {
    let t = Thresholds::default();
    let quiet = DecisionInput {
        now: now(),
        new_feedback: 0,
        new_signals: 0,
        last_training_at: Some(now() - Duration::days(1)),
        quality: None,
        force: false,
        rejected_same_data: None,
        principles: Some(Vec::new()),
    };
    let d = decide(&quiet, &t);
    assert!(!d.retrain, "{d:?}");
    assert!(!d.trigger("principles").unwrap().fired);
    // No principles tracked: the trigger is not listed at all.
    let untracked = DecisionInput {
        principles: None,
        ..quiet.clone()
    };
    assert!(decide(&untracked, &t).trigger("principles").is_none());
    let edited = DecisionInput {
        principles: Some(vec!["no-jargon changed".into()]),
        ..quiet.clone()
    };
    let d = decide(&edited, &t);
    assert!(d.retrain, "{d:?}");
    assert_eq!(d.reasons(), "principles");
    assert!(
        d.trigger("principles")
            .unwrap()
            .detail
            .contains("no-jargon changed")
    );
    let cooling = DecisionInput {
        last_training_at: Some(now() - Duration::minutes(30)),
        ..edited
    };
    assert!(
        !decide(&cooling, &t).retrain,
        "the cooldown holds the principles trigger too"
    );
}
