//! The Ray backend of the training stage (`train.backend: ray`, docs/ray.md): instead of training
//! on the runner, the stage hands a job to an existing Ray cluster through the Ray Jobs REST API
//! and waits for it.
//!
//! - [`settings`]: what `train.ray` validates into (where the head is, which entrypoint, what the
//!   job's runtime environment pins);
//! - [`client`]: the Jobs REST API (submit, status, logs, stop) with a bearer token and retries;
//! - [`entrypoint`]: the job's script for each entrypoint (OpenRLHF, the TRL CLI, our own
//!   binary), reading the exported dataset from the object store and writing the checkpoint back,
//!   and the reward stage's trainer in it;
//! - [`policy_entrypoint`]: the policy stage's trainer per entrypoint and algorithm, and which
//!   combinations exist;
//! - [`follow`]: waiting for a job: status polling with backoff, new log lines as they appear,
//!   and what a failure says.
//!
//! Moving the data (export, upload, download) and evaluating the result are `app::ray_stage`'s:
//! it is the only module that knows the dataset, the artifact store and the run directory.

pub mod client;
pub mod entrypoint;
pub mod follow;
pub mod policy_entrypoint;
pub mod settings;

pub use client::{JobInfo, JobStatus, JobsClient, RayError, SubmitOutcome};
pub use settings::{EntrypointKind, RaySettings, TrainBackend};
