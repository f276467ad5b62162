//! Everything that talks to GitHub: the REST API through octocrab (branches, commits, pull
//! requests) and the GitHub Actions runner environment (outputs, step summary, masks,
//! annotations). This module carries out decisions; it never makes them.

pub mod actions;
pub mod github;
pub mod local;
pub mod publish;

pub use github::{GithubError, GithubTarget, RetryPolicy, SecretToken, TokenError};
pub use local::{LocalOutcome, Manifest, commit_to_local_branch, publish_local};
pub use publish::{
    OnExisting, PublishAction, PublishOutcome, PublishRequest, publish, publish_with_retry,
};
