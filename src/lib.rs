//! rlhf-bot: turns human feedback on a chat assistant into a better, reviewed model.
pub mod artifacts;
pub mod forge;
pub mod registry;
pub mod report;
pub mod run_outputs;
