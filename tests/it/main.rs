//! The one integration-test binary (GUIDE §3.11): each area adds a module here.

mod forge_behaviour;
mod forge_contract;
