//! Tools for testing a store of your own, and the applications that use one (feature
//! `testing`): the [conformance] suite that every built-in store passes, and [`FaultyStore`],
//! a wrapper that makes chosen store calls fail, hang or slow down.

pub mod conformance;
mod faults;

pub use faults::{Fault, FaultyStore, StoreOp};
