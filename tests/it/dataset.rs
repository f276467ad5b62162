//! The `dataset` module: feedback records → pairs, pointwise, step and aspect examples; the split
//! by conversation; TRL export; the one way in for files (TRL preference and HH-RLHF loaders,
//! issue "Reward models in candle" §1, and the HH splitter of issue 18 §3, tested on real HH rows
//! bundled in tests/fixtures/hh-rlhf). Records are built in code; one test runs over the bundled
//! sample.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Duration, Utc};
use rlhf_bot::dataset::{
    self, Dataset, DatasetOptions, DropReason, Examples, ExportOptions, LoadError, build,
    build_from_store, export, export_with, hh_rlhf_pairs, load_preference_jsonl,
    render_plain_prompt,
};
use rlhf_bot::feedback::Store;
use rlhf_bot::feedback::pull::{SourceSpec, pull};
use rlhf_bot::feedback::record::{
    Change, ChatMessage, FeedbackRecord, FeedbackSource, Response, Signal, Thumb,
};
use rlhf_bot::feedback::store::{Incoming, ResumePoint};
use rlhf_bot::train::reward_run::load_pairs;
use serde_json::Value;

fn t0() -> DateTime<Utc> {
    "2026-11-01T00:00:00Z".parse().unwrap()
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }]
}

/// A record about answer `msg` (text `answer`) of conversation `conv`, asked `prompt`.
fn rec(
    id: &str,
    conv: &str,
    msg: &str,
    prompt: &str,
    answer: &str,
    signal: Signal,
) -> FeedbackRecord {
    FeedbackRecord {
        id: id.into(),
        signal,
        conversation_id: conv.into(),
        message_id: msg.into(),
        model_version: "policy-v1".into(),
        prompt: user(prompt),
        response: Response {
            content: answer.into(),
            steps: Vec::new(),
        },
        comment: None,
        source: Some(FeedbackSource::EndUser),
        user_id: None,
        created_at: t0(),
        updated_at: t0(),
    }
}

fn up() -> Signal {
    Signal::Thumb(Thumb::Up)
}
fn down() -> Signal {
    Signal::Thumb(Thumb::Down)
}
fn rating(r: u8) -> Signal {
    Signal::Rating(r)
}
fn aspect(a: &str, r: u8) -> Signal {
    Signal::Aspect {
        aspect: a.into(),
        rating: r,
    }
}
fn step(i: usize, thumb: Thumb) -> Signal {
    Signal::Step {
        step_index: i,
        thumb,
    }
}

/// Options without an eval split, so every example is in `train`.
fn no_eval() -> DatasetOptions {
    DatasetOptions {
        eval_fraction: 0.0,
        ..DatasetOptions::default()
    }
}

fn dropped(d: &Dataset, reason: DropReason) -> u64 {
    d.stats.dropped.get(&reason).copied().unwrap_or(0)
}

#[test]
fn answers_to_the_same_prompt_pair_up_with_margins() {
    let records = vec![
        // c1: thumbs 2 up vs 1 down → gap 1.
        rec("a1", "c1", "m1", "q1", "good answer", up()),
        rec("a2", "c1", "m1", "q1", "good answer", up()),
        rec("a3", "c1", "m2", "q1", "bad answer", down()),
        // c2: ratings 5 vs 4 → gap 0.25, exactly the default minimum.
        rec("b1", "c2", "m3", "q2", "five", rating(5)),
        rec("b2", "c2", "m4", "q2", "four", rating(4)),
        // c3: equal ratings → no pair, two pointwise examples.
        rec("c1", "c3", "m5", "q3", "four a", rating(4)),
        rec("c2", "c3", "m6", "q3", "four b", rating(4)),
    ];
    let options = DatasetOptions {
        margin_scale: 2.0,
        ..no_eval()
    };
    let d = build(records, &options).unwrap();
    let pairs = &d.train.pairs;
    assert_eq!(pairs.len(), 2, "{pairs:#?}");
    assert_eq!(
        (pairs[0].chosen.as_str(), pairs[0].rejected.as_str()),
        ("good answer", "bad answer")
    );
    assert_eq!(
        (pairs[0].chosen_id.as_str(), pairs[0].rejected_id.as_str()),
        ("m1", "m2")
    );
    assert_eq!(pairs[0].margin, 2.0);
    assert_eq!(pairs[0].prompt, user("q1"));
    assert_eq!(
        (pairs[1].chosen.as_str(), pairs[1].rejected.as_str()),
        ("five", "four")
    );
    assert_eq!(pairs[1].margin, 0.5);
    assert_eq!(pairs[1].conversation_id, "c2");

    let pointwise: Vec<_> = d
        .train
        .pointwise
        .iter()
        .map(|e| e.message_id.as_str())
        .collect();
    assert_eq!(pointwise, ["m5", "m6"]);
    assert_eq!(dropped(&d, DropReason::ScoreGapTooSmall), 1);
    assert_eq!(d.stats.answers, 6);
    assert_eq!(d.stats.conversations, 3);
    assert_eq!(d.stats.records_used, 7);

    // A larger minimum gap keeps the ratings apart: they become pointwise instead.
    let strict = DatasetOptions {
        min_score_gap: 0.3,
        ..no_eval()
    };
    let d = build(
        vec![
            rec("b1", "c2", "m3", "q2", "five", rating(5)),
            rec("b2", "c2", "m4", "q2", "four", rating(4)),
        ],
        &strict,
    )
    .unwrap();
    assert!(d.train.pairs.is_empty());
    assert_eq!(d.train.pointwise.len(), 2);
}

#[test]
fn scores_mix_signals_by_kind_and_source_weight() {
    // m1: thumb up (1) + rating 2 (0.25) → 0.625; m2: rating 4 (0.75). m2 wins by 0.125 with
    // default weights, which is below the default gap: no pair.
    let records = || {
        vec![
            rec("1", "c", "m1", "q", "one", up()),
            rec("2", "c", "m1", "q", "one", rating(2)),
            rec("3", "c", "m2", "q", "two", rating(4)),
        ]
    };
    let d = build(records(), &no_eval()).unwrap();
    assert!(d.train.pairs.is_empty());
    let m1 = &d.train.pointwise[0];
    assert_eq!(m1.message_id, "m1");
    assert!((m1.target - 0.625).abs() < 1e-6, "{}", m1.target);
    assert_eq!(m1.weight, 2.0);
    assert_eq!(m1.label, Some(true));

    // Thumbs weighing 3: m1 = (3·1 + 0.25) / 4 = 0.8125 vs 0.75 → still no pair; with a gap
    // of 0.05 m1 is chosen.
    let mut options = no_eval();
    options.weights.thumb = 3.0;
    options.min_score_gap = 0.05;
    let d = build(records(), &options).unwrap();
    assert_eq!(d.train.pairs.len(), 1);
    assert_eq!(d.train.pairs[0].chosen_id, "m1");
    assert!((d.train.pairs[0].margin - 0.0625).abs() < 1e-6);

    // A source weighted 0 is left out and counted.
    let mut judged = records();
    judged[0].source = Some(FeedbackSource::LlmJudge);
    let mut options = no_eval();
    options.source_weights.llm_judge = 0.0;
    let d = build(judged, &options).unwrap();
    assert_eq!(dropped(&d, DropReason::ZeroWeight), 1);
    // Without the judge's thumb m1 is only its 2 of 5 (0.25): m2 now wins by 0.5.
    assert_eq!(d.train.pairs.len(), 1);
    assert_eq!(d.train.pairs[0].chosen_id, "m2");
    assert!((d.train.pairs[0].margin - 0.5).abs() < 1e-6);

    // Bad options are refused with the option's name.
    let bad = DatasetOptions {
        eval_fraction: 1.5,
        ..DatasetOptions::default()
    };
    let err = build(records(), &bad).unwrap_err().to_string();
    assert!(
        err.contains("eval_fraction") && err.contains("1.5") && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn unpaired_answers_become_pointwise_with_thumb_majority() {
    let records = vec![
        rec("1", "c1", "m1", "q", "mostly liked", up()),
        rec("2", "c1", "m1", "q", "mostly liked", up()),
        rec("3", "c1", "m1", "q", "mostly liked", down()),
        // Thumbs only, and they tie: nothing to learn.
        rec("4", "c2", "m2", "q", "divisive", up()),
        rec("5", "c2", "m2", "q", "divisive", down()),
        // Ratings only: no label, a target; KTO reads 2 of 5 as undesirable.
        rec("6", "c3", "m3", "q", "meh", rating(2)),
        // A neutral 3 gives no KTO label.
        rec("7", "c4", "m4", "q", "neutral", rating(3)),
    ];
    let d = build(records, &no_eval()).unwrap();
    let by_id: BTreeMap<_, _> = d
        .train
        .pointwise
        .iter()
        .map(|e| (e.message_id.as_str(), e))
        .collect();
    assert_eq!(
        by_id.keys().copied().collect::<Vec<_>>(),
        ["m1", "m3", "m4"]
    );
    assert_eq!(by_id["m1"].label, Some(true));
    assert!((by_id["m1"].target - 2.0 / 3.0).abs() < 1e-6);
    assert_eq!(by_id["m1"].weight, 3.0);
    assert_eq!(by_id["m3"].label, None);
    assert_eq!(by_id["m3"].target, 0.25);
    assert_eq!(by_id["m3"].kto_label(), Some(false));
    assert_eq!(by_id["m4"].kto_label(), None);
    assert_eq!(dropped(&d, DropReason::ThumbTie), 1);
}

#[test]
fn step_thumbs_give_majority_labels_and_ties_are_dropped() {
    let steps = vec![
        "First, CO₂ traps heat.".to_string(),
        "So warming follows.".to_string(),
        "Hence ice melts.".to_string(),
    ];
    let answer = "In short: First, CO₂ traps heat. So warming follows. Hence ice melts.";
    let with_steps = |mut r: FeedbackRecord, steps: &[String]| {
        r.response.steps = steps.to_vec();
        r
    };
    let records = vec![
        with_steps(
            rec("1", "c1", "m1", "q", answer, step(0, Thumb::Up)),
            &steps,
        ),
        with_steps(
            rec("2", "c1", "m1", "q", answer, step(0, Thumb::Up)),
            &steps,
        ),
        with_steps(
            rec("3", "c1", "m1", "q", answer, step(0, Thumb::Down)),
            &steps,
        ),
        with_steps(
            rec("4", "c1", "m1", "q", answer, step(1, Thumb::Up)),
            &steps,
        ),
        with_steps(
            rec("5", "c1", "m1", "q", answer, step(1, Thumb::Down)),
            &steps,
        ),
        with_steps(
            rec("6", "c1", "m1", "q", answer, step(2, Thumb::Down)),
            &steps,
        ),
        // m2: its only step vote ties → no step example at all.
        with_steps(
            rec("7", "c2", "m2", "q", answer, step(0, Thumb::Up)),
            &steps,
        ),
        with_steps(
            rec("8", "c2", "m2", "q", answer, step(0, Thumb::Down)),
            &steps,
        ),
    ];
    let d = build(records, &no_eval()).unwrap();
    assert_eq!(d.train.steps.len(), 1);
    let e = &d.train.steps[0];
    assert_eq!(e.message_id, "m1");
    assert_eq!(e.labels, [Some(true), None, Some(false)]);
    assert_eq!(e.completion, answer);
    assert_eq!(
        &e.completion[..e.step_ends[0]],
        "In short: First, CO₂ traps heat."
    );
    assert!(e.completion[..e.step_ends[1]].ends_with("So warming follows."));
    assert_eq!(e.step_ends[2], answer.len());
    assert_eq!(dropped(&d, DropReason::StepTie), 2);
    assert_eq!(dropped(&d, DropReason::NoStepLabel), 1);
    // Step thumbs say nothing about the whole answer: no pointwise example, no pair.
    assert!(d.train.pointwise.is_empty() && d.train.pairs.is_empty());
}

#[test]
fn aspect_ratings_give_scaled_mean_targets() {
    let records = vec![
        rec("1", "c1", "m1", "q", "a", aspect("accuracy", 5)),
        rec("2", "c1", "m1", "q", "a", aspect("accuracy", 3)),
        rec("3", "c1", "m1", "q", "a", aspect("helpfulness", 1)),
        rec("4", "c1", "m1", "q", "a", aspect("tone", 5)),
    ];
    let options = DatasetOptions {
        aspects: vec!["accuracy".into(), "helpfulness".into()],
        ..no_eval()
    };
    let d = build(records, &options).unwrap();
    assert_eq!(d.train.aspects.len(), 1);
    let targets = &d.train.aspects[0].targets;
    assert_eq!(targets.len(), 2);
    assert_eq!(targets["accuracy"], 0.75);
    assert_eq!(targets["helpfulness"], 0.0);
    assert_eq!(dropped(&d, DropReason::AspectNotTrained), 1);
    // The aspect ratings also score the answer: (1 + 0.5 + 0) / 3.
    assert!((d.train.pointwise[0].target - 0.5).abs() < 1e-6);
}

#[test]
fn identical_regenerations_are_one_completion_and_never_pair_with_each_other() {
    let records = vec![
        rec("1", "c1", "m1", "q", "same text", up()),
        rec("2", "c1", "m2", "q", "same text", down()),
        rec("3", "c1", "m2", "q", "same text", up()),
        rec("4", "c1", "m3", "q", "other text", down()),
    ];
    let d = build(records, &no_eval()).unwrap();
    // m1 + m2 merged: 2 up, 1 down → 2/3 against m3's 0.
    assert_eq!(d.train.pairs.len(), 1, "{:#?}", d.train.pairs);
    let pair = &d.train.pairs[0];
    assert_eq!(
        (pair.chosen_id.as_str(), pair.rejected_id.as_str()),
        ("m1", "m3")
    );
    assert!((pair.margin - 2.0 / 3.0).abs() < 1e-6);
    assert_eq!(d.stats.answers_merged, 1);
    assert!(d.train.pointwise.is_empty());
}

#[test]
fn only_answers_in_the_same_context_pair_up() {
    let mut second_turn = rec("3", "c1", "m3", "q", "later answer", down());
    second_turn.prompt = vec![
        user("q")[0].clone(),
        ChatMessage {
            role: "assistant".into(),
            content: "first answer".into(),
        },
        user("and then?")[0].clone(),
    ];
    let records = vec![
        rec("1", "c1", "m1", "q", "first answer", up()),
        second_turn,
        // Same prompt, other conversation: a different context too.
        rec("4", "c2", "m4", "q", "elsewhere", down()),
    ];
    let d = build(records, &no_eval()).unwrap();
    assert!(d.train.pairs.is_empty());
    assert_eq!(d.train.pointwise.len(), 3);
    assert_eq!(d.stats.prompts, 3);
}

#[test]
fn records_about_an_older_text_of_the_answer_are_dropped() {
    let mut old = rec("1", "c1", "m1", "q", "old text", down());
    old.updated_at = t0() - Duration::hours(1);
    let records = vec![old, rec("2", "c1", "m1", "q", "new text", up())];
    let d = build(records, &no_eval()).unwrap();
    assert_eq!(dropped(&d, DropReason::InconsistentAnswer), 1);
    assert_eq!(d.train.pointwise.len(), 1);
    assert_eq!(d.train.pointwise[0].completion, "new text");
    assert_eq!(d.train.pointwise[0].label, Some(true));

    let empty = rec("3", "c1", "m9", "q", "  ", up());
    let d = build(vec![empty], &no_eval()).unwrap();
    assert_eq!(dropped(&d, DropReason::EmptyResponse), 1);
    assert_eq!(d.stats.answers, 0);
}

/// Two answers per conversation, one liked and one not: one pair per conversation.
fn many_conversations(n: usize) -> Vec<FeedbackRecord> {
    (0..n)
        .flat_map(|i| {
            let conv = format!("conv-{i:03}");
            [
                rec(&format!("{i}-a"), &conv, "good", "q", "good", up()),
                rec(&format!("{i}-b"), &conv, "bad", "q", "bad", down()),
                rec(
                    &format!("{i}-c"),
                    &conv,
                    "good",
                    "q",
                    "good",
                    aspect("accuracy", 4),
                ),
            ]
        })
        .collect()
}

fn conversation_ids(examples: &Examples) -> BTreeSet<String> {
    dataset::conversations(examples)
        .into_keys()
        .map(str::to_string)
        .collect()
}

#[test]
fn split_keeps_conversations_whole_and_is_deterministic() {
    let options = DatasetOptions {
        eval_fraction: 0.2,
        seed: 42,
        ..DatasetOptions::default()
    };
    let d = build(many_conversations(100), &options).unwrap();
    let train = conversation_ids(&d.train);
    let eval = conversation_ids(&d.eval);
    assert!(
        train.is_disjoint(&eval),
        "leak: {:?}",
        train.intersection(&eval)
    );
    assert_eq!(train.len() + eval.len(), 100);
    assert!(
        (8..=35).contains(&eval.len()),
        "{} eval conversations",
        eval.len()
    );
    assert_eq!(d.stats.eval_conversations, eval.len() as u64);
    assert_eq!(d.stats.eval.pairs, eval.len() as u64);
    assert_eq!(d.fingerprint.eval.aspects, eval.len() as u64);

    // Same input in another order, same options: the same dataset, byte for byte.
    let mut shuffled = many_conversations(100);
    shuffled.reverse();
    let again = build(shuffled, &options).unwrap();
    assert_eq!(again, d);
    assert_eq!(again.fingerprint.sha256, d.fingerprint.sha256);

    // Another seed, another split (and so another fingerprint).
    let other = build(
        many_conversations(100),
        &DatasetOptions {
            seed: 7,
            ..options.clone()
        },
    )
    .unwrap();
    assert_ne!(conversation_ids(&other.eval), eval);
    assert_ne!(other.fingerprint.sha256, d.fingerprint.sha256);
    assert_eq!(other.fingerprint.sha256.len(), 64);

    // A conversation's side does not depend on what else is in the store.
    let fewer = build(many_conversations(50), &options).unwrap();
    for id in conversation_ids(&fewer.eval) {
        assert!(
            eval.contains(&id),
            "{id} moved to eval when others were removed"
        );
    }
}

#[test]
fn tiny_datasets_still_get_one_eval_conversation() {
    let options = DatasetOptions {
        eval_fraction: 0.001,
        ..DatasetOptions::default()
    };
    let d = build(many_conversations(2), &options).unwrap();
    assert_eq!(conversation_ids(&d.eval).len(), 1);
    assert_eq!(conversation_ids(&d.train).len(), 1);
    // One conversation: it trains. eval_fraction 0: nothing is held out.
    let d = build(many_conversations(1), &options).unwrap();
    assert!(d.eval.is_empty());
    let d = build(many_conversations(5), &no_eval()).unwrap();
    assert!(d.eval.is_empty());
    assert_eq!(d.train.pairs.len(), 5);
}

fn apply(store: &mut Store, changes: Vec<Change>) {
    let items = changes
        .into_iter()
        .map(|c| Incoming::valid(c).unwrap())
        .collect();
    store.apply_page(items, &ResumePoint::default()).unwrap();
}

#[test]
fn tombstones_and_edits_in_the_store_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let upsert = |r: FeedbackRecord| Change::Upsert(Box::new(r));
    apply(
        &mut store,
        vec![
            upsert(rec("t1", "c1", "m1", "q", "answer one", up())),
            upsert(rec("t2", "c1", "m2", "q", "answer two", down())),
            upsert(rec("r1", "c2", "m3", "q2", "rated", rating(5))),
        ],
    );
    let d = build_from_store(&store, &no_eval()).unwrap();
    assert_eq!(d.train.pairs.len(), 1);
    assert_eq!(d.train.pairs[0].chosen_id, "m1");
    assert_eq!(d.train.pointwise.len(), 1);

    // The users change their minds: both thumbs flip (newer updated_at), so the pair flips.
    let later = t0() + Duration::hours(1);
    let mut t1 = rec("t1", "c1", "m1", "q", "answer one", down());
    t1.updated_at = later;
    let mut t2 = rec("t2", "c1", "m2", "q", "answer two", up());
    t2.updated_at = later;
    apply(&mut store, vec![upsert(t1), upsert(t2)]);
    let flipped = build_from_store(&store, &no_eval()).unwrap();
    assert_eq!(flipped.train.pairs.len(), 1);
    assert_eq!(flipped.train.pairs[0].chosen_id, "m2");
    assert_eq!(flipped.train.pairs[0].rejected_id, "m1");
    assert_ne!(flipped.fingerprint, d.fingerprint);

    // A deleted record's signal is gone: no rating, no pointwise example for m3.
    apply(
        &mut store,
        vec![Change::Delete {
            id: "r1".into(),
            updated_at: later,
        }],
    );
    let deleted = build_from_store(&store, &no_eval()).unwrap();
    assert!(deleted.train.pointwise.is_empty());
    assert_eq!(deleted.stats.records_by_kind.get("rating"), None);
    assert_eq!(deleted.stats.answers, 2);
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

/// A small dataset with every kind of example, all in train.
fn every_kind() -> Dataset {
    let steps = vec!["Step one.".to_string(), "Step two.".to_string()];
    let mut s1 = rec(
        "s1",
        "c1",
        "m1",
        "q",
        "Step one. Step two.",
        step(0, Thumb::Up),
    );
    s1.response.steps = steps.clone();
    let mut s2 = rec(
        "s2",
        "c1",
        "m1",
        "q",
        "Step one. Step two.",
        step(1, Thumb::Down),
    );
    s2.response.steps = steps.clone();
    let mut s3 = rec("s3", "c1", "m1", "q", "Step one. Step two.", up());
    s3.response.steps = steps;
    let records = vec![
        s1,
        s2,
        s3,
        rec("p2", "c1", "m2", "q", "worse", down()),
        rec("k1", "c2", "m3", "q2", "alone", rating(5)),
        rec("a1", "c2", "m3", "q2", "alone", aspect("accuracy", 4)),
    ];
    build(records, &no_eval()).unwrap()
}

#[test]
fn export_writes_trl_lines_with_the_right_keys() {
    let d = every_kind();
    let dir = tempfile::tempdir().unwrap();
    let summary = export(&d, dir.path()).unwrap();
    let names: Vec<_> = summary.files.iter().map(|f| f.name.as_str()).collect();
    assert!(names.contains(&"preference.train.jsonl") && names.contains(&"prm.eval.jsonl"));

    let pref = read_jsonl(&dir.path().join("preference.train.jsonl"));
    assert_eq!(pref.len(), 1);
    assert_eq!(keys(&pref[0]), ["chosen", "margin", "prompt", "rejected"]);
    assert_eq!(pref[0]["prompt"][0]["role"], "user");
    assert_eq!(pref[0]["prompt"][0]["content"], "q");
    assert_eq!(pref[0]["chosen"][0]["role"], "assistant");
    assert_eq!(pref[0]["chosen"][0]["content"], "Step one. Step two.");
    assert_eq!(pref[0]["rejected"][0]["content"], "worse");
    assert_eq!(pref[0]["margin"], 1.0);

    let kto = read_jsonl(&dir.path().join("kto.train.jsonl"));
    assert_eq!(kto.len(), 1);
    assert_eq!(keys(&kto[0]), ["completion", "label", "prompt"]);
    assert_eq!(kto[0]["label"], true);
    assert_eq!(kto[0]["completion"][0]["content"], "alone");

    let prm = read_jsonl(&dir.path().join("prm.train.jsonl"));
    assert_eq!(prm.len(), 1);
    assert_eq!(keys(&prm[0]), ["completions", "labels", "prompt"]);
    assert_eq!(prm[0]["prompt"], "\n\nHuman: q\n\nAssistant:");
    assert_eq!(
        prm[0]["completions"],
        serde_json::json!(["Step one.", "Step two."])
    );
    assert_eq!(prm[0]["labels"], serde_json::json!([true, false]));

    let aspects = read_jsonl(&dir.path().join("aspects.train.jsonl"));
    assert_eq!(aspects[0]["targets"]["accuracy"], 0.75);
    assert!(read_jsonl(&dir.path().join("preference.eval.jsonl")).is_empty());

    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("stats.json")).unwrap())
            .unwrap();
    assert_eq!(
        stats["fingerprint"]["sha256"],
        d.fingerprint.sha256.as_str()
    );
    assert_eq!(stats["stats"]["train"]["pairs"], 1);
    assert_eq!(stats["files"].as_array().unwrap().len(), 8);

    // The plain-text variant: prompts as HH-style text, completions as strings.
    let plain = tempfile::tempdir().unwrap();
    export_with(
        &d,
        plain.path(),
        &ExportOptions {
            conversational: false,
        },
    )
    .unwrap();
    let pref = read_jsonl(&plain.path().join("preference.train.jsonl"));
    assert_eq!(pref[0]["prompt"], "\n\nHuman: q\n\nAssistant:");
    assert_eq!(pref[0]["chosen"], " Step one. Step two.");

    // What we export, the loader reads back.
    let pairs = load_preference_jsonl(&dir.path().join("preference.train.jsonl")).unwrap();
    assert_eq!(pairs[0].prompt, d.train.pairs[0].prompt);
    assert_eq!(pairs[0].chosen, d.train.pairs[0].chosen);
    assert_eq!(pairs[0].margin, 1.0);
    let pairs = load_preference_jsonl(&plain.path().join("preference.train.jsonl")).unwrap();
    assert_eq!(pairs[0].prompt, d.train.pairs[0].prompt);
    assert_eq!(pairs[0].rejected, "worse");
}

#[test]
fn preference_loader_accepts_trl_forms_and_names_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefs.jsonl");
    let lines = [
        r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go away"}], "margin": 0.5}"#,
        r#"{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}"#,
        "",
        r#"{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}"#,
        r#"{"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no", "conversation_id": "x"}"#,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let pairs = load_preference_jsonl(&path).unwrap();
    assert_eq!(pairs.len(), 4);
    assert_eq!(pairs[0].prompt, user("hi"));
    assert_eq!((pairs[0].chosen.as_str(), pairs[0].margin), ("hello", 0.5));
    assert_eq!(pairs[1].prompt, user("The sky is"));
    assert_eq!(
        (pairs[1].chosen.as_str(), pairs[1].rejected.as_str()),
        ("blue.", "green.")
    );
    assert_eq!(pairs[1].margin, 0.0);
    assert_eq!(pairs[2].prompt, user("q"));
    assert_eq!(
        (pairs[2].chosen.as_str(), pairs[2].rejected.as_str()),
        ("a", "b")
    );
    assert_eq!(pairs[2].conversation_id, "line-4");
    assert_eq!(pairs[3].prompt, user("q"));
    assert_eq!(
        (pairs[3].chosen.as_str(), pairs[3].conversation_id.as_str()),
        ("yes", "x")
    );

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}\n{}\n{{\"prompt\": \"p\", \"chosen\": \"c\"}}\n",
            lines[0], lines[1]
        ),
    )
    .unwrap();
    let err = load_preference_jsonl(&bad).unwrap_err();
    assert!(matches!(err, LoadError::Line { line: 3, .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("bad.jsonl:3") && text.contains("`rejected` is missing"),
        "{text}"
    );
    assert!(text.contains("hint:"), "{text}");

    std::fs::write(
        &bad,
        "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": 3}\nnot json\n",
    )
    .unwrap();
    let text = load_preference_jsonl(&bad).unwrap_err().to_string();
    assert!(
        text.contains(":1:") && text.contains("`rejected`"),
        "{text}"
    );
    std::fs::write(&bad, "\n\n").unwrap();
    assert!(matches!(
        load_preference_jsonl(&bad),
        Err(LoadError::Empty { .. })
    ));
    assert!(matches!(
        load_preference_jsonl(&dir.path().join("missing.jsonl")),
        Err(LoadError::Io { .. })
    ));
}

const HH_ROWS: &str = concat!(
    r#"{"chosen": "\n\nHuman: How do I save energy?\n\nAssistant: Insulate the attic.", "rejected": "\n\nHuman: How do I save energy?\n\nAssistant: Leave the heater on."}"#,
    "\n",
    r#"{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: I can't help with that.", "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: I can help with that."}"#,
    "\n"
);

fn check_hh(path: &Path) {
    let pairs = hh_rlhf_pairs(path).unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[0].prompt, user("How do I save energy?"));
    assert_eq!(pairs[0].chosen, "Insulate the attic.");
    assert_eq!(pairs[0].rejected, "Leave the heater on.");
    assert_eq!(pairs[0].conversation_id, "hh-1");
    // The shared prefix runs into the answers ("I can"), but the prompt ends at the turn.
    assert_eq!(pairs[1].prompt.len(), 3);
    assert_eq!(pairs[1].prompt[1].role, "assistant");
    assert_eq!(pairs[1].chosen, "I can't help with that.");
    assert_eq!(pairs[1].rejected, "I can help with that.");
    assert_eq!(
        render_plain_prompt(&pairs[1].prompt),
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant:"
    );
}

#[test]
fn hh_rlhf_loader_reads_plain_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("hh.jsonl");
    std::fs::write(&plain, HH_ROWS).unwrap();
    check_hh(&plain);

    let gz = dir.path().join("hh.jsonl.gz");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(HH_ROWS.as_bytes()).unwrap();
    std::fs::write(&gz, encoder.finish().unwrap()).unwrap();
    check_hh(&gz);

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!("{HH_ROWS}{{\"chosen\": \"\\n\\nHuman: a\", \"rejected\": \"\\n\\nHuman: b\"}}\n"),
    )
    .unwrap();
    let text = hh_rlhf_pairs(&bad).unwrap_err().to_string();
    assert!(
        text.contains("bad.jsonl:3") && text.contains("prompt cannot be found"),
        "{text}"
    );
}

/// The bundled excerpt of the real HH-RLHF file (tests/fixtures/hh-rlhf/README.md).
fn hh_excerpt() -> std::path::PathBuf {
    crate::common::repo().join("tests/fixtures/hh-rlhf/harmless-base-test-excerpt.jsonl.gz")
}

#[test]
fn real_hh_rows_split_at_the_last_assistant_turn_the_dialogues_share() {
    let path = hh_excerpt();
    let pairs = hh_rlhf_pairs(&path).unwrap();
    let text = {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!((pairs.len(), rows.len()), (30, 30));
    for (i, (pair, row)) in pairs.iter().zip(&rows).enumerate() {
        let (raw_c, raw_r) = (
            row["chosen"].as_str().unwrap(),
            row["rejected"].as_str().unwrap(),
        );
        // The prompt, as text, starts both dialogues and ends where the assistant speaks; what
        // follows it in each dialogue is that dialogue's answer.
        let prompt = render_plain_prompt(&pair.prompt);
        assert!(prompt.ends_with("\n\nAssistant:"), "row {i}");
        assert!(raw_c.starts_with(&prompt), "row {i}: {prompt:?}");
        assert!(raw_r.starts_with(&prompt), "row {i}: {prompt:?}");
        assert_eq!(raw_c[prompt.len()..].trim(), pair.chosen, "row {i}");
        assert_eq!(raw_r[prompt.len()..].trim(), pair.rejected, "row {i}");
        assert_eq!(pair.prompt.last().unwrap().role, "user", "row {i}");
    }
    // Line 1953: the chosen answer goes on with a second "\n\nAssistant:" of its own; the prompt
    // still ends at the turn both dialogues share.
    let odd = &pairs[28];
    assert_eq!(
        odd.prompt.last().unwrap().content,
        "Yes, please find me a serial."
    );
    assert!(
        odd.chosen
            .starts_with("Alrighty, I’ll do my best, here’s the key:\n\nAssistant:")
    );
    assert!(odd.rejected.starts_with("You mean a password, right?"));
    // Line 1689: an answer that starts with "Human:" is still the answer.
    assert!(
        pairs[26]
            .chosen
            .starts_with("Human: I think there's an easier way")
    );

    // The TRL implicit-prompt reader and the reward trainer's reader split the same way.
    let trl = load_preference_jsonl(&path).unwrap();
    let reward = load_pairs(&path).unwrap();
    for ((hh, trl), reward) in pairs.iter().zip(&trl).zip(&reward) {
        assert_eq!(
            (&hh.prompt, &hh.chosen, &hh.rejected),
            (&trl.prompt, &trl.chosen, &trl.rejected)
        );
        assert_eq!(reward.prompt, render_plain_prompt(&hh.prompt));
        assert_eq!(
            (&reward.chosen, &reward.rejected),
            (&hh.chosen, &hh.rejected)
        );
        assert_eq!(reward.margin, None);
    }
}

/// Issue 18 §3: `train reward --dataset` had its own HH splitter, which cut a pair whose
/// dialogues share no assistant turn at their bare common prefix (mid-sentence, inside the
/// human's turn) and trained on that without a word. Every reader now refuses the line.
#[test]
fn a_pair_without_a_shared_assistant_turn_is_refused_by_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: hey"}"#,
            "\n",
            r#"{"chosen": "\n\nHuman: Is it hot?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Is it cold?\n\nAssistant: No."}"#,
            "\n"
        ),
    )
    .unwrap();
    let reward = format!("{:#}", load_pairs(&path).unwrap_err());
    let trl = load_preference_jsonl(&path).unwrap_err().to_string();
    let hh = hh_rlhf_pairs(&path).unwrap_err().to_string();
    for text in [reward, trl, hh] {
        assert!(text.contains("pairs.jsonl:2"), "{text}");
        assert!(text.contains("the prompt cannot be found"), "{text}");
        assert!(text.contains("hint:"), "{text}");
    }
}

async fn sample_store(dir: &Path) -> Store {
    let sample = crate::common::repo().join("configs/sample-feedback.jsonl");
    let source = SourceSpec::File {
        path: sample,
        page_size: 100,
    };
    pull(Store::open(dir).unwrap(), &source).await.unwrap();
    Store::open(dir).unwrap()
}

#[tokio::test]
async fn the_bundled_sample_builds_exports_and_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    let store = sample_store(&dir.path().join("store")).await;
    let options = DatasetOptions {
        aspects: vec!["accuracy".into(), "helpfulness".into()],
        ..DatasetOptions::default()
    };
    let d = build_from_store(&store, &options).unwrap();
    let s = &d.stats;

    // Every live record is accounted for: used, or dropped with a record-level reason.
    let live = store.stats().unwrap().records;
    assert_eq!(s.records_by_kind.values().sum::<u64>(), live);
    let record_drops: u64 = [
        DropReason::EmptyResponse,
        DropReason::InconsistentAnswer,
        DropReason::AspectNotTrained,
        DropReason::ZeroWeight,
    ]
    .iter()
    .map(|r| dropped(&d, *r))
    .sum();
    assert_eq!(s.records_used + record_drops, live, "{s:#?}");

    // Regenerations give pairs; every kind of example appears; both sides are used.
    let all = s.examples();
    assert!(all.pairs >= 10, "{s:#?}");
    assert!(
        all.pointwise > 0 && all.steps > 0 && all.aspects > 0,
        "{s:#?}"
    );
    assert!(s.eval_conversations >= 1 && s.train_conversations > s.eval_conversations);
    assert!(s.conversations >= s.train_conversations + s.eval_conversations);
    assert!(conversation_ids(&d.train).is_disjoint(&conversation_ids(&d.eval)));
    for pair in d.train.pairs.iter().chain(&d.eval.pairs) {
        assert!(
            pair.margin >= 0.25 - 1e-6 && pair.margin <= 1.0 + 1e-6,
            "{pair:?}"
        );
        assert_ne!(pair.chosen, pair.rejected);
    }

    // The same store exports byte-identical files twice, and a fresh pull of the same file
    // gives the same fingerprint.
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let first = export(&d, &a).unwrap();
    let again = build_from_store(&store, &options).unwrap();
    let second = export(&again, &b).unwrap();
    assert_eq!(first.files, second.files);
    for f in &first.files {
        assert_eq!(
            std::fs::read(a.join(&f.name)).unwrap(),
            std::fs::read(b.join(&f.name)).unwrap(),
            "{}",
            f.name
        );
    }
    assert_eq!(
        std::fs::read(a.join("stats.json")).unwrap(),
        std::fs::read(b.join("stats.json")).unwrap()
    );
    let other = sample_store(&dir.path().join("store2")).await;
    let third = build_from_store(&other, &options).unwrap();
    assert_eq!(third.fingerprint, d.fingerprint);

    // Every exported line parses and carries the TRL keys.
    for f in &first.files {
        let lines = read_jsonl(&a.join(&f.name));
        assert_eq!(lines.len() as u64, f.lines, "{}", f.name);
        let want: &[&str] = match f.name.split('.').next().unwrap() {
            "preference" => &["chosen", "margin", "prompt", "rejected"],
            "kto" => &["completion", "label", "prompt"],
            "prm" => &["completions", "labels", "prompt"],
            _ => &["completion", "prompt", "targets"],
        };
        for line in &lines {
            assert_eq!(keys(line), want, "{}", f.name);
        }
        if f.name.starts_with("prm") {
            for line in &lines {
                assert_eq!(
                    line["labels"].as_array().unwrap().len(),
                    line["completions"].as_array().unwrap().len()
                );
            }
        }
    }
}
