//! No code: this crate's Cargo.toml asks for one set of features of the workspace's shared
//! dependencies (why there).
