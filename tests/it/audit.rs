//! The feedback audit (issue #19, section 4): an attack where one user floods thumbs-down on
//! the production version, pulled from the real feedback API on loopback. The influence cap holds
//! in the weights the dataset builder applies, the burst is flagged, the quality trigger does not
//! fire on it (while it does with the audit off), and neither the report nor the dataset's files
//! name the user. Plus the agreement estimate on a set with a known flip rate.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rlhf_bot::app::check;
use rlhf_bot::dataset::audit::{self, BurstReason};
use rlhf_bot::dataset::{DatasetOptions, build, build_from_store};
use rlhf_bot::feedback::record::{FeedbackRecord, Response, Signal, Thumb};
use rlhf_bot::feedback::store::LastTraining;
use serde_json::{Value, json};

use crate::common::{Workspace, forced_run_logged};
use crate::feedback_server::{self as server, Records};
use crate::pull::pull_into;

const ATTACKER: &str = "user-mallory-7f3a";
const VERSION: &str = "policy-v1";

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn vote(id: String, user: &str, created: DateTime<Utc>, up: bool, conversation: usize) -> Value {
    json!({
        "id": id,
        "kind": "thumb",
        "thumb": if up { "up" } else { "down" },
        "conversation_id": format!("c{conversation}"),
        "message_id": "m1",
        "model_version": VERSION,
        "prompt": [{"role": "user", "content": format!("Question {conversation} about carbon prices?")}],
        "response": {"content": format!("Answer {conversation}.")},
        "source": "end_user",
        "user_id": user,
        "created_at": at(created),
        "updated_at": at(created),
    })
}

/// 40 honest users, 80% thumbs up, spread over five weeks (hours apart, so no window of an
/// hour holds many of them), and one attacker's 150 thumbs-down within 25 minutes yesterday.
fn attack(now: DateTime<Utc>) -> Vec<Value> {
    let mut records = Vec::new();
    for i in 0..400usize {
        let user = format!("user-honest-{:02}", i % 40);
        // 300 before the recent window (8–35 days ago), 100 inside it (1.5–6.5 days ago).
        let created = if i < 300 {
            now - chrono::Duration::hours(8 * 24 + 2 * i as i64)
        } else {
            now - chrono::Duration::hours(36 + (i as i64 - 300) * 12 / 10)
        };
        records.push(vote(format!("h{i:04}"), &user, created, i % 5 != 0, i));
    }
    let flood_start = now - chrono::Duration::hours(20);
    for k in 0..150usize {
        let created = flood_start + chrono::Duration::seconds(10 * k as i64);
        records.push(vote(format!("x{k:04}"), ATTACKER, created, false, k % 400));
    }
    records.sort_by(|a, b| {
        (a["updated_at"].as_str(), a["id"].as_str())
            .cmp(&(b["updated_at"].as_str(), b["id"].as_str()))
    });
    records
}

fn config(ws: &Workspace, url: &str, audit: &str) -> std::path::PathBuf {
    ws.http_config(
        url,
        &format!(
            "registry:\n  path: {}\nreport:\n  dir: {}\n{audit}",
            ws.path().join("registry.yaml").display(),
            ws.path().join("reports").display()
        ),
    )
}

#[tokio::test]
async fn a_flood_from_one_user_is_capped_flagged_and_kept_out_of_the_quality_trigger() {
    let now = Utc::now();
    let srv = server::start(Records::List(attack(now)), Duration::ZERO);
    let ws = Workspace::new();
    pull_into(&ws, &srv).await.unwrap();
    ws.store()
        .set_last_training(&LastTraining {
            at: now - chrono::Duration::days(3),
            watermark: None,
            production_version: Some(VERSION.into()),
            promoted_at: Some(now - chrono::Duration::days(60)),
        })
        .unwrap();

    // The audit off: the flood drags the recent positive rate from 80% to 32% and fires.
    let off =
        rlhf_bot::config::load(&config(&ws, &srv.url(), "audit:\n  enabled: false\n")).unwrap();
    let outcome = check(&off, false).unwrap();
    let quality = outcome.decision.trigger("quality").unwrap();
    assert!(quality.fired, "{quality:?}");

    // The audit on (defaults): the burst is held out, the trigger stays quiet and says why.
    let on = rlhf_bot::config::load(&config(&ws, &srv.url(), "")).unwrap();
    let outcome = check(&on, false).unwrap();
    let quality = outcome.decision.trigger("quality").unwrap();
    assert!(!quality.fired, "{quality:?}");
    assert!(
        quality
            .detail
            .contains("150 records of flagged feedback bursts held out"),
        "{}",
        quality.detail
    );
    assert_eq!(outcome.held_bursts.len(), 1, "{:?}", outcome.held_bursts);

    // The cap holds in the weights the dataset builder applied.
    let store = ws.store();
    let dataset = build_from_store(&store, &on.dataset).unwrap();
    let influence = dataset.stats.influence.clone().unwrap();
    assert!(influence.largest_share_before > 0.25, "{influence:?}");
    assert!(influence.largest_share_after <= 0.2 + 1e-9, "{influence:?}");
    assert_eq!(
        (influence.capped_users, influence.records_down_weighted),
        (1, 150)
    );
    assert_eq!(influence.contributors, 41);

    // The burst: one, on the production version, for both reasons, all 150 votes, one user.
    let integrity = audit::integrity(&store, &on.dataset, &on.audit).unwrap();
    assert_eq!(integrity.bursts.len(), 1, "{:#?}", integrity.bursts);
    let burst = &integrity.bursts[0];
    assert_eq!((burst.votes, burst.users, burst.cleared), (150, 1, false));
    assert_eq!(
        burst.reasons,
        vec![BurstReason::FewUsers, BurstReason::NewUsers]
    );
    assert_eq!(burst.id, outcome.held_bursts[0]);
    // The flood is not honest disagreement: its labels are left out of the agreement.
    assert_eq!(integrity.agreement.held_out_labels, 150);
    let burst_id = burst.id.clone();

    // A person clears it: the votes count again and the trigger fires on them.
    let cleared = rlhf_bot::config::load(&config(
        &ws,
        &srv.url(),
        &format!("audit:\n  cleared_bursts: [{burst_id}]\n"),
    ))
    .unwrap();
    let outcome = check(&cleared, false).unwrap();
    assert!(outcome.decision.trigger("quality").unwrap().fired);
    assert!(outcome.held_bursts.is_empty());

    // Nothing the report or the dataset files hold names a user.
    let mut ctx = crate::report::passing();
    ctx.integrity = Some(integrity);
    let rendered = rlhf_bot::report::render(&ctx).unwrap();
    assert!(
        rendered.markdown.contains("### Integrity"),
        "{}",
        rendered.markdown
    );
    assert!(
        rendered
            .markdown
            .contains("1 of 41 contributors were down-weighted (150 records)")
    );
    assert!(rendered.markdown.contains(&burst_id));
    let exported = ws.path().join("export");
    rlhf_bot::dataset::export(&dataset, &exported).unwrap();
    let mut texts = vec![rendered.markdown, rendered.pr_body, rendered.metrics_json];
    for entry in std::fs::read_dir(&exported).unwrap() {
        texts.push(std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    for text in &texts {
        assert!(
            !text.contains("mallory") && !text.contains("user-honest"),
            "a user id leaked:\n{text}"
        );
    }
}

fn labelled(answer: usize, user: usize, up: bool) -> FeedbackRecord {
    let t = DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    FeedbackRecord {
        id: format!("r{answer}-{user}"),
        signal: Signal::Thumb(if up { Thumb::Up } else { Thumb::Down }),
        conversation_id: format!("c{answer}"),
        message_id: "m".into(),
        model_version: "v".into(),
        prompt: Vec::new(),
        response: Response {
            content: format!("a{answer}"),
            steps: Vec::new(),
        },
        comment: None,
        source: None,
        user_id: Some(format!("u{user}")),
        created_at: t,
        updated_at: t,
    }
}

/// Audit settings under which the constructed sets (every label at one instant, from raters
/// never seen before) are not a burst.
fn no_bursts() -> audit::AuditSettings {
    audit::AuditSettings {
        burst: audit::BurstSettings {
            min_votes: 1_000_000,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn the_label_noise_estimate_recovers_a_known_flip_rate() {
    // Two raters per answer, each label flipped with ε = 0.1: raters disagree on a share
    // 2ε(1 − ε) = 0.18 of the answers. 1000 answers, exactly 180 disagreements.
    let mut scan = audit::Scan::default();
    for answer in 0..1000 {
        let truth = answer % 2 == 0;
        let disagree = answer % 50 < 9;
        scan.add(&labelled(answer, 2 * answer, truth));
        scan.add(&labelled(answer, 2 * answer + 1, truth != disagree));
    }
    let (_, agreement) = scan.finish(&no_bursts());
    assert_eq!(
        (agreement.answers_multi_rated, agreement.rater_pairs),
        (1000, 1000)
    );
    assert_eq!(agreement.rater_pairs_agreeing, 820);
    let flip = agreement.flip_rate.unwrap();
    assert!((flip.estimate - 0.1).abs() < 1e-9, "{flip:?}");
    assert!(
        flip.low < 0.1 && flip.high > 0.1 && flip.high - flip.low < 0.05,
        "{flip:?}"
    );
    assert_eq!(agreement.suggested_label_smoothing, Some(0.1));

    // One rater who labels the same answer twice, once each way, is noise too.
    let mut scan = audit::Scan::default();
    scan.add(&labelled(1, 1, true));
    let mut again = labelled(1, 1, false);
    again.id = "r1-1-again".into();
    scan.add(&again);
    let (_, dup) = scan.finish(&no_bursts());
    assert_eq!((dup.duplicate_pairs, dup.duplicate_pairs_agreeing), (1, 0));
    assert_eq!(
        dup.suggested_label_smoothing, None,
        "one pair is below min_agreement_pairs"
    );
}

/// The cap reaches the losses: a pair built only from a capped user's votes carries the share
/// of its evidence the cap left as its weight (the answers' scores alone would not show it: one
/// user's scaled votes give the same means), and so does a capped user's KTO thumb; without the
/// cap, and for everyone else, there is no weight (1).
#[test]
fn the_cap_down_weights_a_capped_users_pairs_and_thumbs() {
    // u0 rates two answers of conversation c0 (m1 up, m2 down: a pair) and thumbs 20 other
    // answers; nine other users thumb one answer each.
    let mut records = Vec::new();
    for (msg, up) in [("m1", true), ("m2", false)] {
        let mut r = labelled(0, 0, up);
        r.id = format!("pair-{msg}");
        r.message_id = msg.into();
        r.response.content = format!("answer {msg}");
        records.push(r);
    }
    for k in 1..=20 {
        let mut r = labelled(k, 0, true);
        r.id = format!("heavy{k}");
        records.push(r);
    }
    for u in 1..10 {
        records.push(labelled(100 + u, u, true));
    }
    let options = |cap| DatasetOptions {
        max_user_share: cap,
        eval_fraction: 0.0,
        ..Default::default()
    };
    let with = build(records.clone(), &options(Some(0.2))).unwrap();
    let without = build(records, &options(None)).unwrap();
    let pair_weight = |d: &rlhf_bot::dataset::Dataset| {
        let pairs: Vec<_> = d
            .train
            .pairs
            .iter()
            .filter(|p| p.conversation_id == "c0")
            .collect();
        assert_eq!(pairs.len(), 1);
        pairs[0].weight
    };
    assert_eq!(pair_weight(&without), None);
    let w = pair_weight(&with).expect("the capped user's pair has a weight");
    let i = with.stats.influence.clone().unwrap();
    assert!(w > 0.0 && w < 1.0, "{w}");
    // Every vote of u0 was scaled by the same factor: the pair's weight is that factor.
    let heavy = with
        .train
        .pointwise
        .iter()
        .find(|e| e.conversation_id == "c1")
        .unwrap();
    assert_eq!(heavy.influence, Some(w), "{i:?}");
    let light = with
        .train
        .pointwise
        .iter()
        .find(|e| e.conversation_id == "c101")
        .unwrap();
    assert_eq!(light.influence, None);
    assert!(
        without
            .train
            .pointwise
            .iter()
            .all(|e| e.influence.is_none())
    );
}

#[test]
fn the_cap_scales_a_heavy_user_down_without_dropping_a_record() {
    // u0 rates answers a and b (b worse), nine other users rate a once each.
    let mut records = Vec::new();
    for k in 0..30 {
        let mut r = labelled(k, 0, k % 2 == 0);
        r.id = format!("heavy{k}");
        records.push(r);
    }
    for u in 1..10 {
        records.push(labelled(100 + u, u, true));
    }
    let capped = DatasetOptions {
        max_user_share: Some(0.2),
        eval_fraction: 0.0,
        ..Default::default()
    };
    let open = DatasetOptions {
        eval_fraction: 0.0,
        ..Default::default()
    };
    let with = build(records.clone(), &capped).unwrap();
    let without = build(records, &open).unwrap();
    assert_eq!(
        with.stats.records_used, without.stats.records_used,
        "no record is dropped"
    );
    assert_eq!(with.train.counts(), without.train.counts());
    let i = with.stats.influence.unwrap();
    assert!((i.largest_share_after - 0.2).abs() < 1e-9, "{i:?}");
    assert!(without.stats.influence.is_none());
    // The heavy user's examples carry less evidence.
    let heavy_weight: f32 = with
        .train
        .pointwise
        .iter()
        .filter(|e| e.conversation_id == "c0")
        .map(|e| e.weight)
        .sum();
    assert!(heavy_weight < 1.0, "{heavy_weight}");
}

#[test]
fn apply_label_smoothing_trains_dpo_with_the_estimated_flip_rate() {
    let ws = Workspace::new();
    let config = ws.write_config(&format!(
        "{}audit:\n  apply_label_smoothing: true\n",
        ws.sample_config_text()
    ));
    let (out, log) = forced_run_logged(&config, "2026-11-27T12:00:00Z", &[]);
    let line = log
        .lines()
        .find(|l| l.contains("DPO label_smoothing set from rater agreement"))
        .unwrap_or_else(|| panic!("no smoothing line in the log:\n{log}"));
    // `label_smoothing=0.123`: the value the trainer got, and the one the report states.
    let value: f64 = line
        .split("label_smoothing=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(value > 0.0 && value < 0.5, "{line}");
    let report = std::fs::read_to_string(out["run"]["report"].as_str().unwrap()).unwrap();
    assert!(
        report.contains(&format!("DPO trained with `label_smoothing` {value:.3}")),
        "{report}"
    );
    assert!(
        !log.contains("u_1") && !log.contains("u_2"),
        "a user id reached the log"
    );
}
