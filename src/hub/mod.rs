//! Models from the Hugging Face Hub: `hf://ORG/NAME[@REVISION]` is accepted wherever a model
//! path is (config keys and `--model` flags), and resolves to a local directory by downloading
//! through the Hub's HTTP API into the cache that HF tools share (`$HF_HOME/hub`), so a model
//! fetched by `huggingface_hub` is reused here and the other way round.
//!
//! - [`model_ref`]: parsing `hf://` references (what config validation and the CLI accept);
//! - [`env`]: the environment HF tools read (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`,
//!   `HF_TOKEN` and the token file, `HF_HUB_OFFLINE`);
//! - [`cache`]: the cache layout (`blobs/`, `snapshots/`, `refs/`) and reading a pinned commit
//!   back from a snapshot path (the registry's lineage);
//! - [`download`]: the HTTP side (revision info, resolve with its headers, resumable and
//!   verified blob downloads) and the error messages a user acts on.
//!
//! Pushing to the Hub is `deploy::hub`; both share the retry loop in `crate::retry`.

pub mod cache;
pub mod download;
pub mod env;
pub mod model_ref;

pub use download::{HubDownloadError, HubDownloader, Resolved};
pub use env::HubEnv;
pub use model_ref::HubModelRef;
