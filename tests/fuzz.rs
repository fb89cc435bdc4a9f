//! The fuzz targets (`fallback_chat::fuzz`) in `make test`: every committed corpus input
//! replayed (fuzz/corpus/<target>/: the seeds and what `make fuzz` found worth keeping,
//! regressions included), then a short run of mutations of them, with proptest shrinking any
//! failure to a small input. `make fuzz` runs the same targets under libFuzzer for longer.

use std::path::{Path, PathBuf};

use fallback_chat::fuzz;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target, u32)] = &[
    ("event", fuzz::event, 300),
    ("request", fuzz::request, 300),
    ("body", fuzz::body, 1000),
    ("response", fuzz::response, 2000),
    ("stream", fuzz::stream, 1000),
    ("config", fuzz::config, 500),
];

/// What libFuzzer's dictionaries would add: the bytes that change how these inputs parse.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\n",
    b"\n\n",
    b"\r\n",
    b"data: ",
    b"[DONE]",
    b"%",
    b"%ZZ",
    b"%00",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e309",
    b"18446744073709551616",
    b"NaN",
    b"\xff\xfe",
    b"\"stream\":true",
    b"\"messages\":[]",
    b"\"content\":null",
    b"\"n\":2",
    b"retry-after: ",
    b"retry-after-ms: ",
    b"Thu, 01 Jan 1970 00:00:00 GMT",
    b"content_filter",
    b"?query=",
    b"&query=",
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| std::fs::read(path).expect("a corpus file"))
        .collect()
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, usize),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Splice(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Flip(at, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, t)| Edit::Insert(at, t)),
        (any::<usize>(), 1usize..64).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), 1usize..64).prop_map(|(at, n)| Edit::Duplicate(at, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(at, from)| Edit::Splice(at, from)),
    ]
}

fn apply(mut data: Vec<u8>, other: &[u8], edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match *edit {
            Edit::Flip(i, b) if !data.is_empty() => {
                let i = i % data.len();
                data[i] ^= b.max(1);
            }
            Edit::Flip(..) => data.push(0),
            Edit::Insert(i, t) => {
                let i = at(i, data.len());
                data.splice(i..i, TOKENS[t].iter().copied());
            }
            Edit::Delete(i, n) => {
                let i = at(i, data.len());
                let end = (i + n).min(data.len());
                data.drain(i..end);
            }
            Edit::Duplicate(i, n) => {
                let i = at(i, data.len());
                let end = (i + n).min(data.len());
                let piece = data[i..end].to_vec();
                data.splice(i..i, piece);
            }
            // Another input's tail in place of this one's: libFuzzer's crossover.
            Edit::Splice(i, from) => {
                let i = at(i, data.len());
                let from = at(from, other.len());
                data.truncate(i);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
    data
}

fn run(name: &str, target: Target, cases: u32) {
    let seeds = corpus(name);
    assert!(
        !seeds.is_empty(),
        "fuzz/corpus/{name} is empty: the replay would test nothing"
    );
    for input in &seeds {
        target(input);
    }
    // The same mutations on every run: `make test` must not fail by chance. `make fuzz` explores.
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let n = seeds.len();
    let strategy = (0..n, 0..n, prop::collection::vec(edit(), 1..6));
    let result = runner.run(&strategy, |(seed, other, edits)| {
        let input = apply(seeds[seed].clone(), &seeds[other], &edits);
        target(&input);
        Ok(())
    });
    if let Err(error) = result {
        panic!("fuzz target {name}: {error}");
    }
}

#[test]
fn every_target_has_a_corpus_and_a_test() {
    let dirs: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"))
            .expect("fuzz/corpus")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
    for (name, _, _) in TARGETS {
        assert!(dirs.iter().any(|d| d == name), "no fuzz/corpus/{name}");
    }
    let targets =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .expect("fuzz/Cargo.toml");
    for (name, _, _) in TARGETS {
        assert!(
            targets.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] for {name}"
        );
    }
}

#[test]
fn lambda_events() {
    run("event", fuzz::event, TARGETS[0].2);
}

#[test]
fn http_requests() {
    run("request", fuzz::request, TARGETS[1].2);
}

#[test]
fn openai_request_bodies() {
    run("body", fuzz::body, TARGETS[2].2);
}

#[test]
fn upstream_answers() {
    run("response", fuzz::response, TARGETS[3].2);
}

#[test]
fn upstream_streams() {
    run("stream", fuzz::stream, TARGETS[4].2);
}

#[test]
fn configuration() {
    run("config", fuzz::config, TARGETS[5].2);
}
