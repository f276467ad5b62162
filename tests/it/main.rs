//! The one integration-test binary (GUIDE §3.11): each area adds a `mod` here.
mod policy_model;
