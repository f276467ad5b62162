//! The one integration-test binary (GUIDE §3.11): one module per area.

mod llama;
mod policy_model;
