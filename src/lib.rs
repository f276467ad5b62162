//! rlhf-bot: turns human feedback on a chat assistant into a better, reviewed model.
pub mod forge;
pub mod model;
