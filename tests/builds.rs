//! One build of each dependency serves every command that `make test` runs: `cargo test
//! --workspace`, `cargo lambda watch` (the function alone) and `cargo build -p
//! azure-openai-emulator` resolve every shared crate with the same features, so none of them
//! rebuilds what another has built (crates/workspace-hack/Cargo.toml says why and how).
//!
//! It asks `cargo tree` for the features each command would resolve, as Cargo resolves them, and
//! names every crate whose features differ: the line to add to the workspace-hack.

use std::collections::BTreeMap;
use std::process::Command;

/// `package version` → its features, as `cargo tree` resolves them for `args`.
fn resolved(args: &[&str]) -> BTreeMap<String, String> {
    let output = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "--prefix",
            "none",
            "--format",
            "{p}|{f}",
        ])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut features = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let line = line.replace(" (*)", "").replace(" (proc-macro)", "");
        let Some((package, list)) = line.trim().split_once('|') else {
            continue;
        };
        // Path dependencies carry their path: the name and version say enough.
        let package = package.split(" (").next().unwrap_or(package).to_owned();
        features.insert(package, list.to_owned());
    }
    features
}

#[test]
fn one_build_serves_every_command() {
    let tests = resolved(&["--workspace", "--edges", "normal,dev"]);
    let mut differ = Vec::new();
    for (command, args) in [
        (
            "cargo lambda watch",
            ["--package", "fallback-chat", "--edges", "normal"],
        ),
        (
            "cargo build -p azure-openai-emulator",
            ["--package", "azure-openai-emulator", "--edges", "normal"],
        ),
    ] {
        for (package, features) in resolved(&args) {
            if let Some(in_tests) = tests.get(&package)
                && *in_tests != features
            {
                differ.push(format!(
                    "{command}: {package} gets [{features}], cargo test gets [{in_tests}]"
                ));
            }
        }
    }
    assert!(
        differ.is_empty(),
        "these crates would be built twice; add the missing features to \
         crates/workspace-hack/Cargo.toml:\n{}",
        differ.join("\n")
    );
}

#[test]
fn the_comparison_sees_a_difference() {
    // The check itself: bench/hello is outside the workspace-hack (a cold-start baseline with
    // lambda_http alone), so it resolves some shared crate with fewer features than the tests.
    let tests = resolved(&["--workspace", "--edges", "normal,dev"]);
    let hello = resolved(&["--package", "hello", "--edges", "normal"]);
    assert!(
        hello
            .iter()
            .any(|(package, features)| tests.get(package).is_some_and(|t| t != features)),
        "bench/hello resolves like the test build: the comparison cannot see a difference"
    );
}
