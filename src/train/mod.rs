//! Training: losses as pure tensor functions (`losses`), the engine every objective runs on
//! (`engine`: data order, accumulation, clipping, checkpoint/resume, guards, the per-step metrics
//! log, evaluation and early stopping, progress), the objectives (`reward_trainer`,
//! `dpo_trainer`, `kto_trainer`, `ppo_trainer`), and what they share: our own AdamW with savable
//! state (`optim`), learning-rate schedules (`schedule`), atomic checkpoints (`checkpoint`) and
//! guards (`guard`).

pub mod batching;
pub mod checkpoint;
pub mod device;
pub mod dpo_trainer;
pub mod engine;
pub mod group_rl_trainer;
pub mod guard;
pub mod kto_trainer;
pub mod losses;
pub mod optim;
pub mod policy_common;
pub mod policy_eval;
pub mod policy_reward;
pub mod ppo_trainer;
pub mod progress;
pub mod ray;
pub mod reward_models;
pub mod reward_run;
pub mod reward_scorer;
pub mod reward_trainer;
pub mod schedule;
pub mod step_rewards;
