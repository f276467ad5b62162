//! The command line of the policy stage's Ray job, for each entrypoint and algorithm
//! (docs/ray.md lists them as built). The script around the trainer — private directory, fetch,
//! checkpoint upload with the manifest last — is [`super::entrypoint`]'s, shared with the reward
//! job; this module owns which trainer runs and with which flags, and which combinations exist.
//!
//! The job reads `policy.train.jsonl` and `policy.eval.jsonl` (the run's export in TRL's
//! formats: preference pairs for DPO, `{prompt, completion, label}` for KTO, prompts for the
//! online algorithms; the evaluation prompts held out of training) and, for every algorithm
//! that scores answers while it trains, the reward model the reward job wrote (`$work/reward`).
//! It writes the policy (full weights or a LoRA adapter) to `out/policy/`, a local run's layout.
//!
//! Flag names are those of the versions docs/ray.md cites: OpenRLHF up to 0.10.1
//! (`openrlhf/cli/train_dpo.py`, `train_ppo_ray.py`; `train_kto.py` up to 0.9.5, removed in
//! 0.9.6) and TRL's CLI (`trl dpo|kto|grpo|rloo`, 1.x; it has no PPO command).

use super::entrypoint::{
    DROP_CHECKPOINTS, JobPaths, TrainerRun, aws_script, bin, device_flag, openrlhf_deepspeed,
    rlhf_bot, s, trl_cli, work,
};
use super::settings::{EntrypointKind, RaySettings};
use crate::run::outputs::PolicyAlgo;

/// The exported training and evaluation files of the policy stage, by name (`datasets` maps
/// `*eval*` to the `test` split, which the TRL CLI reads).
pub const POLICY_TRAIN_FILE: &str = "policy.train.jsonl";
pub const POLICY_EVAL_FILE: &str = "policy.eval.jsonl";
/// The config our binary trains with on the cluster, uploaded beside the data: the run's
/// `policy:` section, so the job trains with the hyper-parameters a local run would.
pub const POLICY_CONFIG_FILE: &str = "job.yaml";

/// The first OpenRLHF release without `openrlhf.cli.train_kto`.
const OPENRLHF_WITHOUT_KTO: (u64, u64, u64) = (0, 9, 6);

/// The hyper-parameters the OpenRLHF and TRL trainers are given (from `policy.*`); our binary
/// reads its own from the uploaded config instead.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyJob {
    pub algo: PolicyAlgo,
    /// The policy to start from, as the cluster can read it; `None`: our binary's tiny default
    /// (the `rlhf-bot` entrypoint only).
    pub base_model: Option<String>,
    /// Optimiser steps; `None`: `epochs` passes (DPO/KTO).
    pub steps: Option<u64>,
    pub epochs: u64,
    pub lr: f64,
    /// DPO/KTO β; the KL coefficient of the online algorithms.
    pub beta: f64,
    pub label_smoothing: f64,
    pub batch_size: usize,
    pub max_prompt_len: usize,
    pub max_completion_len: usize,
    /// Answers sampled per prompt (GRPO, RLOO).
    pub num_generations: usize,
    /// LoRA rank and α, when the policy trains an adapter.
    pub lora: Option<(usize, f64)>,
}

/// Whether `kind` can train `algo`, given the pinned packages; the error says why not and what
/// to do. `config` calls it at load, the stage again for `run --algo`.
pub fn check_supported(
    kind: EntrypointKind,
    algo: PolicyAlgo,
    pip: &[String],
) -> Result<(), String> {
    match (kind, algo) {
        (EntrypointKind::Trl, PolicyAlgo::Ppo) => Err(
            "the TRL CLI has no PPO command (`trl` offers dpo, kto, grpo and rloo)\nhint: set policy.algo to grpo or rloo, or train.ray.entrypoint to openrlhf or rlhf-bot".into(),
        ),
        (EntrypointKind::Openrlhf, PolicyAlgo::Kto) => match pinned_version(pip, "openrlhf") {
            Some(v) if v >= OPENRLHF_WITHOUT_KTO => Err(format!(
                "OpenRLHF {}.{}.{} (train.ray.runtime_env.pip) has no KTO trainer: `openrlhf.cli.train_kto` was removed in 0.9.6\nhint: pin openrlhf==0.9.5, or set train.ray.entrypoint to trl or rlhf-bot, or policy.algo to dpo",
                v.0, v.1, v.2
            )),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// The `MAJOR.MINOR.PATCH` that `NAME==VERSION` pins `name` to, if any.
fn pinned_version(pip: &[String], name: &str) -> Option<(u64, u64, u64)> {
    pip.iter().find_map(|req| {
        let (pkg, version) = req.split_once("==")?;
        let pkg = pkg.split('[').next()?.trim();
        if !pkg.eq_ignore_ascii_case(name) {
            return None;
        }
        let mut parts = version.trim().split('.').map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u64>()
                .ok()
        });
        Some((
            parts.next()??,
            parts.next()??,
            parts.next().flatten().unwrap_or(0),
        ))
    })
}

/// The job's whole entrypoint for training the policy; `paths.reward_model` must be set when the
/// algorithm (or, for our binary, its evaluation) reads the reward model.
pub fn policy_entrypoint(
    ray: &RaySettings,
    paths: &JobPaths,
    job: &PolicyJob,
) -> Result<String, String> {
    check_supported(ray.entrypoint, job.algo, &ray.pip)?;
    let mut train = match ray.entrypoint {
        EntrypointKind::RlhfBot => our_binary(ray, job),
        EntrypointKind::Openrlhf => openrlhf(ray, job),
        EntrypointKind::Trl => trl(ray, job),
    };
    train.extend(ray.extra_args.iter().cloned());
    Ok(match ray.entrypoint {
        EntrypointKind::RlhfBot => rlhf_bot(ray, paths, train),
        _ => aws_script(paths, train, Some(DROP_CHECKPOINTS)),
    })
}

fn data(name: &str) -> String {
    work(&format!("data/{name}"))
}

/// `rlhf-bot train policy`: the algorithm as a flag, everything else from the uploaded config.
fn our_binary(ray: &RaySettings, job: &PolicyJob) -> Vec<String> {
    let mut words = bin(
        ray,
        &format!("data/{POLICY_CONFIG_FILE}"),
        &[
            s("train"),
            s("policy"),
            s("--algo"),
            s(job.algo.as_str()),
            s("--data"),
            data(POLICY_TRAIN_FILE),
            s("--reward-model"),
            work("reward"),
            s("--out"),
            work("out"),
            s("--device"),
            device_flag(ray),
        ],
    );
    if let Some(model) = &job.base_model {
        words.extend([s("--model"), model.clone()]);
    }
    words
}

/// The flags both stages' trainers share, for this job.
fn trainer_run<'a>(trainer: &'a str, job: &'a PolicyJob) -> TrainerRun<'a> {
    TrainerRun {
        trainer,
        model: job.base_model.as_deref().unwrap_or_default(),
        train_file: POLICY_TRAIN_FILE,
        eval_file: POLICY_EVAL_FILE,
        keys: Vec::new(),
        save: "out/policy",
        epochs: job.epochs.to_string(),
        max_len: (job.max_prompt_len + job.max_completion_len).to_string(),
        batch_size: job.batch_size.to_string(),
        lr: job.lr.to_string(),
    }
}

fn openrlhf(ray: &RaySettings, job: &PolicyJob) -> Vec<String> {
    let gpus = ray.gpus_per_node.to_string();
    let mut words = match job.algo {
        PolicyAlgo::Dpo => {
            let keys = vec![
                s("--prompt_key"),
                s("prompt"),
                s("--chosen_key"),
                s("chosen"),
                s("--rejected_key"),
                s("rejected"),
                s("--label_smoothing"),
                job.label_smoothing.to_string(),
            ];
            openrlhf_deepspeed(
                ray,
                TrainerRun {
                    keys,
                    ..trainer_run("openrlhf.cli.train_dpo", job)
                },
            )
        }
        PolicyAlgo::Kto => {
            let keys = [
                "--input_key",
                "prompt",
                "--output_key",
                "completion",
                "--label_key",
                "label",
            ]
            .map(s)
            .to_vec();
            openrlhf_deepspeed(
                ray,
                TrainerRun {
                    keys,
                    ..trainer_run("openrlhf.cli.train_kto", job)
                },
            )
        }
        PolicyAlgo::Ppo | PolicyAlgo::Grpo | PolicyAlgo::Rloo => {
            let (estimator, samples) = match job.algo {
                PolicyAlgo::Ppo => ("gae", 1),
                PolicyAlgo::Grpo => ("group_norm", job.num_generations),
                _ => ("rloo", job.num_generations),
            };
            let run = trainer_run("openrlhf.cli.train_ppo_ray", job);
            // `train_ppo_ray` places its own actors on the cluster (it calls `ray.init()`,
            // which joins the job's cluster), so it runs as a plain module, not under deepspeed.
            let mut w = vec![
                s("python3"),
                s("-m"),
                s(run.trainer),
                s("--pretrain"),
                s(run.model),
                s("--reward_pretrain"),
                work("reward"),
                s("--prompt_data"),
                data(POLICY_TRAIN_FILE),
                s("--input_key"),
                s("prompt"),
                s("--advantage_estimator"),
                s(estimator),
                s("--n_samples_per_prompt"),
                samples.to_string(),
                s("--save_path"),
                work(run.save),
                s("--actor_num_gpus_per_node"),
                gpus.clone(),
                s("--ref_num_gpus_per_node"),
                gpus.clone(),
                s("--reward_num_gpus_per_node"),
                gpus.clone(),
            ];
            if job.algo == PolicyAlgo::Ppo {
                w.extend([s("--critic_num_gpus_per_node"), gpus]);
            }
            w.extend([
                s("--max_len"),
                run.max_len,
                s("--max_new_tokens"),
                job.max_completion_len.to_string(),
                s("--rollout_batch_size"),
                run.batch_size,
                s("--train_batch_size"),
                (job.batch_size * samples).to_string(),
                s("--micro_rollout_batch_size"),
                s("1"),
                s("--micro_train_batch_size"),
                s("1"),
                s("--num_episodes"),
                run.epochs,
                s("--actor_learning_rate"),
                run.lr,
            ]);
            w
        }
    };
    let beta = if job.algo.is_online() {
        "--init_kl_coef"
    } else {
        "--beta"
    };
    words.extend([s(beta), job.beta.to_string()]);
    if let Some((rank, alpha)) = job.lora {
        words.extend([
            s("--lora_rank"),
            rank.to_string(),
            s("--lora_alpha"),
            alpha.to_string(),
        ]);
    }
    words
}

fn trl(ray: &RaySettings, job: &PolicyJob) -> Vec<String> {
    let command = match job.algo {
        PolicyAlgo::Dpo => "dpo",
        PolicyAlgo::Kto => "kto",
        PolicyAlgo::Grpo => "grpo",
        PolicyAlgo::Rloo => "rloo",
        // Refused by `check_supported` before this runs.
        PolicyAlgo::Ppo => "ppo",
    };
    let run = trainer_run(command, job);
    let max_len = run.max_len.clone();
    let mut words = trl_cli(ray, run);
    words.extend([s("--beta"), job.beta.to_string()]);
    if let Some(steps) = job.steps {
        words.extend([s("--max_steps"), steps.to_string()]);
    }
    if job.algo.is_online() {
        words.extend([
            s("--reward_model_name_or_path"),
            work("reward"),
            s("--num_generations"),
            job.num_generations.to_string(),
            s("--max_completion_length"),
            job.max_completion_len.to_string(),
        ]);
    } else {
        words.extend([s("--max_length"), max_len]);
    }
    if job.algo == PolicyAlgo::Dpo {
        words.extend([s("--label_smoothing"), job.label_smoothing.to_string()]);
    }
    if let Some((rank, alpha)) = job.lora {
        words.extend([
            s("--use_peft"),
            s("--lora_r"),
            rank.to_string(),
            s("--lora_alpha"),
            alpha.to_string(),
        ]);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALGOS: [PolicyAlgo; 5] = [
        PolicyAlgo::Dpo,
        PolicyAlgo::Kto,
        PolicyAlgo::Ppo,
        PolicyAlgo::Grpo,
        PolicyAlgo::Rloo,
    ];

    fn settings(kind: EntrypointKind, pip: &[&str]) -> RaySettings {
        let mut s = RaySettings::new("http://127.0.0.1:8265".parse().unwrap(), kind);
        s.rlhf_bot_command = "/opt/rlhf bot/rlhf-bot".into();
        s.pip = pip.iter().map(|p| p.to_string()).collect();
        s
    }

    fn job(algo: PolicyAlgo) -> PolicyJob {
        PolicyJob {
            algo,
            base_model: Some("Qwen/Qwen2.5-0.5B-Instruct".into()),
            steps: Some(3),
            epochs: 1,
            lr: 1e-6,
            beta: 0.1,
            label_smoothing: 0.0,
            batch_size: 4,
            max_prompt_len: 128,
            max_completion_len: 64,
            num_generations: 4,
            lora: Some((8, 16.0)),
        }
    }

    fn paths() -> JobPaths {
        JobPaths {
            data: "s3://b/m/ray/r1/policy/data".into(),
            output: "s3://b/m/ray/r1/policy/output".into(),
            reward_model: Some("s3://b/m/ray/r1/reward/output".into()),
        }
    }

    fn build(kind: EntrypointKind, algo: PolicyAlgo) -> Result<String, String> {
        policy_entrypoint(&settings(kind, &["openrlhf==0.9.5"]), &paths(), &job(algo))
    }

    #[test]
    fn every_supported_combination_is_a_valid_shell_script() {
        let mut built = 0;
        for kind in [
            EntrypointKind::RlhfBot,
            EntrypointKind::Openrlhf,
            EntrypointKind::Trl,
        ] {
            for algo in ALGOS {
                let Ok(text) = build(kind, algo) else {
                    continue;
                };
                built += 1;
                super::super::entrypoint::assert_shell_parses(&text, &format!("{kind:?} {algo:?}"));
                assert!(
                    text.contains("s3://b/m/ray/r1/reward/output"),
                    "{kind:?} {algo:?}: the reward model is not fetched\n{text}"
                );
            }
        }
        // All but TRL's PPO.
        assert_eq!(built, 14);
    }

    #[test]
    fn our_binary_trains_the_policy_with_the_uploaded_config_and_drops_its_checkpoints() {
        let text = build(EntrypointKind::RlhfBot, PolicyAlgo::Dpo).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[4],
            "'/opt/rlhf bot/rlhf-bot' --config \"$work/job.yaml\" bucket get s3://b/m/ray/r1/policy/data \"$work/data\""
        );
        assert_eq!(
            lines[5],
            "'/opt/rlhf bot/rlhf-bot' --config \"$work/job.yaml\" bucket get s3://b/m/ray/r1/reward/output \"$work/reward\""
        );
        assert_eq!(
            lines[6],
            "'/opt/rlhf bot/rlhf-bot' --config \"$work/data/job.yaml\" train policy --algo dpo --data \"$work/data/policy.train.jsonl\" --reward-model \"$work/reward\" --out \"$work/out\" --device cpu --model Qwen/Qwen2.5-0.5B-Instruct"
        );
        assert_eq!(lines[7], DROP_CHECKPOINTS);
        assert!(lines[8].ends_with("bucket put \"$work/out\" s3://b/m/ray/r1/policy/output"));
    }

    #[test]
    fn openrlhf_runs_dpo_and_kto_under_deepspeed_and_the_online_algorithms_on_its_ray_trainer() {
        let dpo = build(EntrypointKind::Openrlhf, PolicyAlgo::Dpo).unwrap();
        assert!(dpo.contains("deepspeed --num_gpus 1 --module openrlhf.cli.train_dpo --pretrain Qwen/Qwen2.5-0.5B-Instruct --dataset \"$work/data/policy.train.jsonl\" --eval_dataset \"$work/data/policy.eval.jsonl\" --prompt_key prompt --chosen_key chosen --rejected_key rejected"), "{dpo}");
        assert!(
            dpo.contains("--save_path \"$work/out/policy\" --max_epochs 1 --max_len 192"),
            "{dpo}"
        );
        assert!(
            dpo.contains("--beta 0.1 --lora_rank 8 --lora_alpha 16"),
            "{dpo}"
        );
        let kto = build(EntrypointKind::Openrlhf, PolicyAlgo::Kto).unwrap();
        assert!(
            kto.contains("--module openrlhf.cli.train_kto")
                && kto.contains("--input_key prompt --output_key completion --label_key label"),
            "{kto}"
        );
        for (algo, estimator, samples) in [
            (PolicyAlgo::Ppo, "gae", 1),
            (PolicyAlgo::Grpo, "group_norm", 4),
            (PolicyAlgo::Rloo, "rloo", 4),
        ] {
            let text = build(EntrypointKind::Openrlhf, algo).unwrap();
            assert!(text.contains(&format!("python3 -m openrlhf.cli.train_ppo_ray --pretrain Qwen/Qwen2.5-0.5B-Instruct --reward_pretrain \"$work/reward\" --prompt_data \"$work/data/policy.train.jsonl\" --input_key prompt --advantage_estimator {estimator} --n_samples_per_prompt {samples}")), "{text}");
            assert_eq!(
                text.contains("--critic_num_gpus_per_node"),
                algo == PolicyAlgo::Ppo,
                "{text}"
            );
            assert!(
                text.contains(
                    "aws s3 cp --recursive s3://b/m/ray/r1/reward/output/ \"$work/reward\""
                ),
                "{text}"
            );
        }
        // No flag of OpenRLHF's that 0.10.1 does not know.
        assert!(!dpo.contains("--bf16"));
    }

    #[test]
    fn trl_runs_its_cli_commands_and_refuses_ppo() {
        for (algo, cmd) in [
            (PolicyAlgo::Dpo, "trl dpo"),
            (PolicyAlgo::Kto, "trl kto"),
            (PolicyAlgo::Grpo, "trl grpo"),
            (PolicyAlgo::Rloo, "trl rloo"),
        ] {
            let text = build(EntrypointKind::Trl, algo).unwrap();
            assert!(text.contains(&format!("{cmd} --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name \"$work/data\" --dataset_train_split train --dataset_test_split test --output_dir \"$work/out/policy\"")), "{text}");
            assert!(
                text.contains("--max_steps 3")
                    && text.contains("--use_peft --lora_r 8 --lora_alpha 16"),
                "{text}"
            );
            assert_eq!(
                text.contains("--reward_model_name_or_path \"$work/reward\""),
                algo.is_online(),
                "{text}"
            );
        }
        let refused = build(EntrypointKind::Trl, PolicyAlgo::Ppo).unwrap_err();
        assert!(
            refused.contains("no PPO command") && refused.contains("hint:"),
            "{refused}"
        );
    }

    #[test]
    fn openrlhf_kto_is_refused_where_the_pinned_release_dropped_it() {
        let pip = |v: &str| {
            vec![
                format!("openrlhf[vllm]=={v}"),
                "awscli==1.42.70".to_string(),
            ]
        };
        let e =
            check_supported(EntrypointKind::Openrlhf, PolicyAlgo::Kto, &pip("0.10.1")).unwrap_err();
        assert!(
            e.contains("OpenRLHF 0.10.1") && e.contains("removed in 0.9.6") && e.contains("hint:"),
            "{e}"
        );
        assert!(check_supported(EntrypointKind::Openrlhf, PolicyAlgo::Kto, &pip("0.9.6")).is_err());
        assert!(check_supported(EntrypointKind::Openrlhf, PolicyAlgo::Kto, &pip("0.9.5")).is_ok());
        assert!(check_supported(EntrypointKind::Openrlhf, PolicyAlgo::Dpo, &pip("0.10.1")).is_ok());
        assert!(check_supported(EntrypointKind::RlhfBot, PolicyAlgo::Ppo, &[]).is_ok());
    }
}
