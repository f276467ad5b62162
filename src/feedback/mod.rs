//! Human feedback: the domain records, the sources they come from (the feedback HTTP API or a
//! JSONL file), the durable local store they land in, and the `pull` stage that moves them.

pub mod file_source;
pub mod http_source;
pub mod pull;
pub mod record;
pub mod store;

pub use record::{FeedbackRecord, Signal, Thumb};
pub use store::Store;
