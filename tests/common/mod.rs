//! Shared test code. Each test crate uses what it needs of it.
#![allow(dead_code, unreachable_pub)]

pub mod conformance;
