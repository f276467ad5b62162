//! The command line a Ray job runs, for each entrypoint (docs/ray.md lists them as built).
//!
//! Every job is one POSIX shell script (Ray runs the entrypoint through a shell) that:
//! 1. makes a private working directory (removed when the script exits, whatever happens);
//! 2. fetches the exported dataset from the object store (the reward stage:
//!    `preference.train.jsonl`, `preference.eval.jsonl` in TRL's preference format, which
//!    OpenRLHF reads as is; the policy stage: `policy.train.jsonl`, `policy.eval.jsonl`, see
//!    [`policy`](super::policy_entrypoint)) and, for the policy stage, the reward model the reward
//!    job wrote;
//! 3. trains into `out/` (the policy stage into `out/policy/`, a local run's layout), then drops
//!    the trainer's resumable checkpoints, which nobody reads back;
//! 4. uploads `out/` to the output prefix with a `SHA256SUMS` manifest written last, so the
//!    submitter never reads a half-written checkpoint (the artifact store's rule).
//!
//! Our binary moves the data with `rlhf-bot bucket get|put` (any bucket the artifact store
//! reads: `s3://`, `gs://`, `az://`); OpenRLHF and TRL jobs use the AWS CLI (`aws s3 cp`) and
//! `sha256sum`, so the output prefix of those is `s3://` only. Versions are never chosen here:
//! the job installs what `train.ray.runtime_env.pip` pins.

use super::settings::{EntrypointKind, RaySettings};

/// The hyper-parameters the job trains with (from `reward.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct RewardJob {
    /// The model to start from, as the cluster can read it (a path on its nodes, `hf://…`, or a
    /// Hub name for OpenRLHF/TRL); `None`: our binary's small default (the `rlhf-bot` entrypoint
    /// only).
    pub base_model: Option<String>,
    pub epochs: u32,
    pub max_length: usize,
    pub batch_size: usize,
    pub lr: f64,
}

/// Where the job reads its data and writes its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPaths {
    /// The prefix holding the exported dataset, e.g. `s3://bucket/models/ray/<run>/reward/data`.
    pub data: String,
    /// The prefix the job writes the checkpoint to.
    pub output: String,
    /// The prefix holding a model the job reads besides its data (the policy stage: the reward
    /// job's output), fetched to `$work/reward`.
    pub reward_model: Option<String>,
}

/// The exported training and evaluation files, by name.
pub const TRAIN_FILE: &str = "preference.train.jsonl";
pub const EVAL_FILE: &str = "preference.eval.jsonl";

/// Quotes one word for a POSIX shell: as is when it holds only safe characters, else in single
/// quotes with each `'` closed, escaped and reopened.
pub fn sh_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@+,%".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Joins words into a command line, quoting each; words starting with `"$work` are the
/// script's own variable and are left for the shell to expand (they are ours, never input).
pub(super) fn command(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if w.starts_with("\"$work") {
                w.clone()
            } else {
                sh_quote(w)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn work(rel: &str) -> String {
    format!("\"$work/{rel}\"")
}

/// The script's first lines: strict mode and the private working directory.
fn prologue() -> Vec<String> {
    vec![
        "set -eu".to_string(),
        "work=$(mktemp -d)".to_string(),
        "trap 'rm -rf \"$work\"' EXIT".to_string(),
    ]
}

/// What the job fetches: the data to `$work/data`, and the reward model to `$work/reward`.
fn fetches(paths: &JobPaths) -> Vec<(String, String)> {
    let mut list = vec![(paths.data.clone(), work("data"))];
    if let Some(reward) = &paths.reward_model {
        list.push((reward.clone(), work("reward")));
    }
    list
}

pub(super) fn s(text: impl Into<String>) -> String {
    text.into()
}

/// One run of an OpenRLHF DeepSpeed trainer or a TRL CLI command: what the two stages share.
pub(super) struct TrainerRun<'a> {
    /// OpenRLHF's module (`openrlhf.cli.train_rm`) or TRL's command (`reward`).
    pub trainer: &'a str,
    pub model: &'a str,
    /// The data files in `$work/data` (OpenRLHF; TRL reads the directory by split).
    pub train_file: &'a str,
    pub eval_file: &'a str,
    /// OpenRLHF: the flags that name the data's keys, after the files.
    pub keys: Vec<String>,
    /// Where the model goes, relative to `$work`.
    pub save: &'a str,
    pub epochs: String,
    pub max_len: String,
    pub batch_size: String,
    pub lr: String,
}

/// `deepspeed --module TRAINER …` with the flags every OpenRLHF DeepSpeed trainer takes.
pub(super) fn openrlhf_deepspeed(ray: &RaySettings, run: TrainerRun) -> Vec<String> {
    let mut words = vec![
        s("deepspeed"),
        s("--num_gpus"),
        ray.gpus_per_node.to_string(),
        s("--module"),
        s(run.trainer),
        s("--pretrain"),
        s(run.model),
        s("--dataset"),
        work(&format!("data/{}", run.train_file)),
        s("--eval_dataset"),
        work(&format!("data/{}", run.eval_file)),
    ];
    words.extend(run.keys);
    words.extend([
        s("--save_path"),
        work(run.save),
        s("--max_epochs"),
        run.epochs,
        s("--max_len"),
        run.max_len,
        s("--train_batch_size"),
        run.batch_size,
        s("--micro_train_batch_size"),
        s("1"),
        s("--learning_rate"),
        run.lr,
    ]);
    words
}

/// `trl TRAINER …` with the flags every TRL training command takes (the length flags differ).
/// TRL's configs default to bf16, which transformers refuses without a GPU, so a CPU job
/// (`num_gpus: 0`) says `--use_cpu`; `--report_to none` keeps a cluster's installed trackers
/// (wandb, …) from asking for logins the job does not have.
pub(super) fn trl_cli(ray: &RaySettings, run: TrainerRun) -> Vec<String> {
    let mut words = vec![
        s("trl"),
        s(run.trainer),
        s("--model_name_or_path"),
        s(run.model),
        s("--dataset_name"),
        work("data"),
        s("--dataset_train_split"),
        s("train"),
        s("--dataset_test_split"),
        s("test"),
        s("--output_dir"),
        work(run.save),
        s("--num_train_epochs"),
        run.epochs,
        s("--per_device_train_batch_size"),
        run.batch_size,
        s("--learning_rate"),
        run.lr,
        s("--report_to"),
        s("none"),
    ];
    if ray.num_gpus == 0.0 {
        words.push(s("--use_cpu"));
    }
    words
}

/// The job's whole entrypoint for training the reward model.
pub fn reward_entrypoint(ray: &RaySettings, paths: &JobPaths, job: &RewardJob) -> String {
    let run = || TrainerRun {
        trainer: "",
        model: job.base_model.as_deref().unwrap_or_default(),
        train_file: TRAIN_FILE,
        eval_file: EVAL_FILE,
        keys: Vec::new(),
        save: "out",
        epochs: job.epochs.to_string(),
        max_len: job.max_length.to_string(),
        batch_size: job.batch_size.to_string(),
        lr: job.lr.to_string(),
    };
    let mut train = match ray.entrypoint {
        EntrypointKind::RlhfBot => return rlhf_bot(ray, paths, reward_rlhf_bot(ray, job)),
        EntrypointKind::Openrlhf => openrlhf_deepspeed(
            ray,
            TrainerRun {
                trainer: "openrlhf.cli.train_rm",
                keys: [
                    "--apply_chat_template",
                    "--prompt_key",
                    "prompt",
                    "--chosen_key",
                    "chosen",
                    "--rejected_key",
                    "rejected",
                ]
                .map(s)
                .to_vec(),
                ..run()
            },
        ),
        EntrypointKind::Trl => {
            let mut words = trl_cli(
                ray,
                TrainerRun {
                    trainer: "reward",
                    ..run()
                },
            );
            words.extend([s("--max_length"), job.max_length.to_string()]);
            words
        }
    };
    train.extend(ray.extra_args.iter().cloned());
    aws_script(paths, train, Some(DROP_CHECKPOINTS))
}

/// Our binary's command: `rlhf-bot --config CONFIG ARGS…`, `config` relative to `$work`.
pub(super) fn bin(ray: &RaySettings, config: &str, args: &[String]) -> Vec<String> {
    let mut words = vec![ray.rlhf_bot_command.clone(), s("--config"), work(config)];
    words.extend_from_slice(args);
    words
}

pub(super) fn device_flag(ray: &RaySettings) -> String {
    s(if ray.num_gpus > 0.0 { "cuda" } else { "cpu" })
}

/// `rlhf-bot train reward …` (the config file is the script's own).
fn reward_rlhf_bot(ray: &RaySettings, job: &RewardJob) -> Vec<String> {
    let mut train = bin(
        ray,
        "job.yaml",
        &[
            s("train"),
            s("reward"),
            s("--dataset"),
            work(&format!("data/{TRAIN_FILE}")),
            s("--eval"),
            work(&format!("data/{EVAL_FILE}")),
            s("--out"),
            work("out"),
            s("--epochs"),
            job.epochs.to_string(),
            s("--max-length"),
            job.max_length.to_string(),
            s("--batch-size"),
            job.batch_size.to_string(),
            s("--lr"),
            job.lr.to_string(),
            s("--device"),
            device_flag(ray),
        ],
    );
    if let Some(model) = &job.base_model {
        train.extend([s("--model"), model.clone()]);
    }
    train.extend(ray.extra_args.iter().cloned());
    train
}

/// Our binary around `train`: it moves the data itself (`bucket get|put`, any bucket the
/// artifact store reads).
pub(super) fn rlhf_bot(ray: &RaySettings, paths: &JobPaths, train: Vec<String>) -> String {
    let mut lines = prologue();
    // `bucket` wants a config file; it reads nothing from it but a (never opened) source.
    lines.push(
        "printf 'feedback:\\n  source: file\\n  path: /dev/null\\n' >\"$work/job.yaml\""
            .to_string(),
    );
    for (uri, dir) in fetches(paths) {
        lines.push(command(&bin(
            ray,
            "job.yaml",
            &[s("bucket"), s("get"), uri, dir],
        )));
    }
    lines.push(command(&train));
    if paths.reward_model.is_some() {
        lines.push(DROP_CHECKPOINTS.to_string());
    }
    lines.push(command(&bin(
        ray,
        "job.yaml",
        &[s("bucket"), s("put"), work("out"), paths.output.clone()],
    )));
    lines.join("\n")
}

/// The trainers' resumable state (ours: `out/checkpoints/`; TRL's: `checkpoint-N/` beside the
/// model, optimizer state included), dropped before the upload: the submitter reads the model only.
pub(super) const DROP_CHECKPOINTS: &str =
    "rm -rf \"$work/out/checkpoints\" \"$work/out\"/checkpoint-* \"$work/out/policy\"/checkpoint-*";

/// OpenRLHF and TRL: the data through the AWS CLI, the manifest by `sha256sum` (the format
/// `SHA256SUMS` has by design), uploaded after every other file.
pub(super) fn aws_script(paths: &JobPaths, train: Vec<String>, cleanup: Option<&str>) -> String {
    let output = format!("{}/", paths.output.trim_end_matches('/'));
    let mut lines = prologue();
    for (uri, dir) in fetches(paths) {
        let prefix = format!("{}/", uri.trim_end_matches('/'));
        lines.push(command(&[
            s("aws"),
            s("s3"),
            s("cp"),
            s("--recursive"),
            prefix,
            dir,
        ]));
    }
    lines.push(command(&train));
    lines.extend(cleanup.map(str::to_string));
    lines.push(s(
        "(cd \"$work/out\" && find . -type f ! -name SHA256SUMS -printf '%P\\n' | LC_ALL=C sort | xargs -r -d '\\n' sha256sum >SHA256SUMS)",
    ));
    lines.push(command(&[
        s("aws"),
        s("s3"),
        s("cp"),
        s("--recursive"),
        s("--exclude"),
        s("SHA256SUMS"),
        work("out"),
        output.clone(),
    ]));
    lines.push(command(&[
        s("aws"),
        s("s3"),
        s("cp"),
        work("out/SHA256SUMS"),
        format!("{output}SHA256SUMS"),
    ]));
    lines.join("\n")
}

/// Fails the test unless `sh -n` (which parses without running anything) accepts `text`.
#[cfg(test)]
pub(super) fn assert_shell_parses(text: &str, what: &str) {
    let checked = std::process::Command::new("sh")
        .args(["-n", "-c", text])
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{what}: {}\n{text}",
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(kind: EntrypointKind) -> RaySettings {
        let mut s = RaySettings::new("http://127.0.0.1:8265".parse().unwrap(), kind);
        s.rlhf_bot_command = "/opt/rlhf bot/rlhf-bot".into();
        s
    }

    fn job() -> RewardJob {
        RewardJob {
            base_model: Some("Qwen/Qwen2.5-0.5B-Instruct".into()),
            epochs: 2,
            max_length: 256,
            batch_size: 8,
            lr: 1e-4,
        }
    }

    fn paths() -> JobPaths {
        JobPaths {
            data: "s3://b/m/ray/r1/reward/data".into(),
            output: "s3://b/m/ray/r1/reward/output".into(),
            reward_model: None,
        }
    }

    #[test]
    fn every_entrypoint_is_a_valid_shell_script() {
        for kind in [
            EntrypointKind::RlhfBot,
            EntrypointKind::Openrlhf,
            EntrypointKind::Trl,
        ] {
            let text = reward_entrypoint(&settings(kind), &paths(), &job());
            assert_shell_parses(&text, &format!("{kind:?}"));
        }
    }

    #[test]
    fn quoting_leaves_plain_words_and_wraps_the_rest() {
        assert_eq!(sh_quote("s3://b/x-1"), "s3://b/x-1");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn our_binary_fetches_trains_and_uploads_in_a_private_directory() {
        let text = reward_entrypoint(&settings(EntrypointKind::RlhfBot), &paths(), &job());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..3],
            [
                "set -eu",
                "work=$(mktemp -d)",
                "trap 'rm -rf \"$work\"' EXIT"
            ]
        );
        assert_eq!(
            lines[4],
            "'/opt/rlhf bot/rlhf-bot' --config \"$work/job.yaml\" bucket get s3://b/m/ray/r1/reward/data \"$work/data\""
        );
        assert!(lines[5].contains("train reward --dataset \"$work/data/preference.train.jsonl\" --eval \"$work/data/preference.eval.jsonl\" --out \"$work/out\" --epochs 2 --max-length 256 --batch-size 8 --lr 0.0001 --device cpu --model Qwen/Qwen2.5-0.5B-Instruct"), "{}", lines[5]);
        assert!(lines[6].ends_with("bucket put \"$work/out\" s3://b/m/ray/r1/reward/output"));
    }

    #[test]
    fn openrlhf_and_trl_train_between_two_aws_copies_with_the_manifest_last() {
        let text = reward_entrypoint(&settings(EntrypointKind::Openrlhf), &paths(), &job());
        assert!(text.contains("aws s3 cp --recursive s3://b/m/ray/r1/reward/data/ \"$work/data\""));
        assert!(text.contains("deepspeed --num_gpus 1 --module openrlhf.cli.train_rm --pretrain Qwen/Qwen2.5-0.5B-Instruct"));
        // 0.9.5 and later take `--param_dtype` (bf16 by default) and refuse `--bf16`.
        assert!(!text.contains("--bf16"), "{text}");
        let files = text.find("--exclude SHA256SUMS").unwrap();
        let manifest = text
            .find("\"$work/out/SHA256SUMS\" s3://b/m/ray/r1/reward/output/SHA256SUMS")
            .unwrap();
        assert!(files < manifest);
        let text = reward_entrypoint(&settings(EntrypointKind::Trl), &paths(), &job());
        assert!(text.contains("trl reward --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name \"$work/data\""));
        // Run for real with TRL 1.16.0 (tests/it/ray_trl.rs): bf16 by default is refused on a
        // CPU node, and TRL's `checkpoint-N/` (optimizer state) is not uploaded.
        assert!(text.contains("--report_to none"), "{text}");
        assert!(
            text.contains("--report_to none --use_cpu"),
            "a CPU job: {text}"
        );
        assert!(text.contains(DROP_CHECKPOINTS), "{text}");
        let mut gpu = settings(EntrypointKind::Trl);
        gpu.num_gpus = 1.0;
        let text = reward_entrypoint(&gpu, &paths(), &job());
        assert!(!text.contains("--use_cpu"), "a GPU job: {text}");
    }
}
