//! The scenario tests: the real handler, fed real Lambda events, in front of the Azure OpenAI
//! emulator (and moto's server where AWS is involved). One test binary for all of them: they
//! share the harness in tests/common, which each binary of its own compiled and linked again
//! (a minute of CI's time). Run one file's tests with `cargo test --test scenarios fleet::`.
//!
//! Tests that need a process of their own stay separate: tests/metrics.rs installs the global
//! metrics recorder, tests/init_error.rs and tests/builds.rs run processes, tests/fuzz.rs
//! replays the corpus, tests/structure.rs reads the source.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod continuation;
mod embeddings;
mod entra;
mod events;
mod fallback;
mod fleet;
mod limits;
mod openai;
mod policy;
mod responses;
mod routing;
mod secrets;
mod streaming;
mod summary;
mod tls;
