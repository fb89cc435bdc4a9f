//! The shape of `src/`: imports point down, no module imports another in a circle, the leaves
//! import nothing from the crate, and a few facts stay where they belong (reqwest in net.rs and
//! upstream/, rustls in net.rs, lambda_http in http/, DynamoDB in health/ and limits/, `impl App` in lib.rs
//! and http/, `impl Engine` in routing/engine.rs, the health table owned by routing/sync.rs alone,
//! and the Engine lent to nothing inside routing/). What a lint can say instead is said by one:
//! clippy.toml keeps reading the time in clock.rs and HTTP statuses in http/ and upstream/, and
//! lib.rs denies `unwrap` outside tests.
//!
//! It reads the source: every `use` tree and every inline `crate::`/`super::`/`self::` path,
//! with comments and string literals removed, resolved to the module that holds the item. That
//! is what cargo-modules' `--acyclic` check does with rustc's help; this reads the text instead,
//! so it runs in `cargo test` with nothing to install, and also checks the layer order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, bottom up. A module may import from a lower layer, or from its own folder.
const LAYERS: &[(&str, u8)] = &[
    ("clock", 0),
    ("secret", 0),
    ("attempt", 0),
    ("outcome", 0),
    ("sse", 0),
    ("reply", 0),
    ("error", 0),
    // Fuzz targets: beside lib.rs, over everything.
    ("fuzz", 5),
    ("pool", 1),
    ("telemetry", 1),
    ("net", 1),
    ("config", 2),
    ("upstream", 2),
    ("health", 2),
    ("routing", 3),
    ("limits", 3),
    ("http", 4),
    // lib.rs: builds the App.
    ("", 5),
];

/// Where some facts may appear, as (what, pattern, the only modules allowed, with their
/// children).
const CONFINED: &[(&str, &str, &[&str])] = &[
    ("reqwest", "reqwest", &["net", "upstream"]),
    ("TLS", "rustls", &["net"]),
    ("lambda_http", "lambda_http", &["http"]),
    ("DynamoDB", "aws_sdk_dynamodb", &["health", "limits"]),
    // One owner of health, so one writer: the failover loop and the relay record through it.
    (
        "the health table",
        "HealthTable",
        &["health", "routing::sync"],
    ),
];

/// Modules that only the listed ones may import: (module, its only importers).
const PRIVATE: &[(&str, &[&str])] = &[
    // The Engine lends the policy what it borrows; nothing inside routing/ holds the Engine.
    ("routing::engine", &["routing"]),
];

/// `impl T` blocks and the one module each may appear in (besides lib.rs for App).
const IMPLS: &[(&str, &[&str])] = &[("App", &["", "http"]), ("Engine", &["routing::engine"])];

#[test]
fn src_imports_point_down_without_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    read_tree(&root, &root, &mut files);
    let problems = check(&files);
    assert!(
        problems.is_empty(),
        "the module structure of src/ broke its rules:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_check_finds_a_cycle_an_upward_import_and_a_misplaced_fact() {
    let tree = |files: &[(&str, &str)]| -> String {
        let files: BTreeMap<String, String> = files
            .iter()
            .map(|(f, t)| (f.to_string(), t.to_string()))
            .collect();
        check(&files).join("\n")
    };
    // A folder whose mod.rs re-exports a child that imports back through the parent.
    let problems = tree(&[
        ("lib.rs", "pub mod routing;"),
        (
            "routing/mod.rs",
            "mod engine;\npub use engine::Engine;\npub struct Settings;",
        ),
        (
            "routing/engine.rs",
            "use super::Settings;\npub struct Engine;",
        ),
    ]);
    assert_eq!(problems, "cycle: routing -> routing::engine -> routing");

    let problems = tree(&[
        ("lib.rs", "pub mod pool; pub mod routing;"),
        ("pool.rs", "use crate::routing::Engine;"),
        ("routing/mod.rs", "pub struct Engine;"),
    ]);
    assert_eq!(
        problems,
        "pool (layer 1) imports routing (layer 3): imports point down"
    );

    let problems = tree(&[
        ("lib.rs", "pub mod clock; pub mod routing;"),
        ("clock.rs", "use crate::routing::Engine;"),
        (
            "routing/mod.rs",
            "fn f() { reqwest::get(1); }\nimpl<C: Clock> App<C> {}",
        ),
    ]);
    assert!(
        problems.contains("(reqwest) in routing/mod.rs"),
        "{problems}"
    );
    assert!(
        problems.contains("impl App in routing/mod.rs"),
        "{problems}"
    );
    assert!(
        problems.contains("clock is a leaf and imports routing"),
        "{problems}"
    );

    // The hub the routing redesign removed: a policy that extends the Engine, a relay that holds
    // it, a second writer of health.
    let problems = tree(&[
        ("lib.rs", "pub mod health; pub mod routing;"),
        ("health/mod.rs", "pub struct HealthTable;"),
        (
            "routing/mod.rs",
            "mod engine; mod failover; mod relay; mod sync;\npub use engine::Engine;",
        ),
        ("routing/engine.rs", "pub struct Engine<C>(C);"),
        (
            "routing/failover.rs",
            "impl<C: Clock> Engine<C> {\n    fn failover(&self) {}\n}",
        ),
        (
            "routing/relay.rs",
            "use super::engine::Engine;\nstruct Relay { engine: Arc<Engine<C>>, health: crate::health::HealthTable }",
        ),
        ("routing/sync.rs", "use crate::health::HealthTable;"),
    ]);
    assert!(
        problems.contains("impl Engine in routing/failover.rs"),
        "{problems}"
    );
    assert!(
        problems.contains("routing::relay imports routing::engine"),
        "{problems}"
    );
    assert!(
        problems.contains("the health table (HealthTable) in routing/relay.rs"),
        "{problems}"
    );
    assert!(!problems.contains("routing/sync.rs"), "{problems}");

    // Comments, strings, renames and a test module's `super` do not count.
    let problems = tree(&[
        ("lib.rs", "pub mod clock; pub mod pool;"),
        (
            "clock.rs",
            "// use crate::pool::X;\nconst S: &str = \"crate::pool::Y\";\nconst C: char = '{';\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
        ),
        ("pool.rs", "use crate::clock::{Clock as Time, self};"),
    ]);
    assert_eq!(problems, "");
}

/// Every `.rs` file under `src/` except `main.rs` (a separate crate), by path from `src/`.
fn read_tree(root: &Path, dir: &Path, files: &mut BTreeMap<String, String>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            read_tree(root, &path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path
                .strip_prefix(root)
                .expect("under src/")
                .to_string_lossy()
                .replace('\\', "/");
            if relative != "main.rs" {
                let text = std::fs::read_to_string(&path).expect("readable source");
                files.insert(relative, text);
            }
        }
    }
}

/// The module a file defines: `lib.rs` is the root (""), `a/mod.rs` and `a.rs` are `a`.
fn module_of(file: &str) -> String {
    let stem = file.trim_end_matches(".rs");
    let stem = stem.strip_suffix("/mod").unwrap_or(stem);
    if stem == "lib" {
        String::new()
    } else {
        stem.replace('/', "::")
    }
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or_default()
}

fn layer(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .find(|(name, _)| *name == top(module))
        .map(|(_, layer)| *layer)
}

fn show(module: &str) -> &str {
    if module.is_empty() { "lib.rs" } else { module }
}

/// Every broken rule, in words.
fn check(files: &BTreeMap<String, String>) -> Vec<String> {
    let modules: BTreeSet<String> = files.keys().map(|f| module_of(f)).collect();
    let mut problems = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();

    for (file, text) in files {
        let module = module_of(file);
        let code = strip(text);
        for (what, pattern, allowed) in CONFINED {
            if code.contains(pattern) && !allowed.iter().any(|a| within(&module, a)) {
                problems.push(format!("{what} ({pattern}) in {file}"));
            }
        }
        for (ty, allowed) in IMPLS {
            if implements(&code, ty) && !allowed.iter().any(|a| within(&module, a)) {
                let places: Vec<&str> = allowed.iter().map(|a| show(a)).collect();
                problems.push(format!(
                    "impl {ty} in {file}: only {} add to {ty}",
                    places.join(" and ")
                ));
            }
        }
        let Some(own_layer) = layer(&module) else {
            problems.push(format!(
                "{file}: module {module} has no layer in tests/structure.rs; add it"
            ));
            continue;
        };
        for target in references(&module, &code, &modules) {
            if target == module {
                continue;
            }
            let target_layer = layer(&target).unwrap_or(u8::MAX);
            if top(&target) != top(&module) && target_layer >= own_layer {
                problems.push(format!(
                    "{} (layer {own_layer}) imports {} (layer {target_layer}): imports point down",
                    show(&module),
                    show(&target)
                ));
            }
            if own_layer == 0 {
                problems.push(format!(
                    "{} is a leaf and imports {} from the crate",
                    show(&module),
                    show(&target)
                ));
            }
            for (private, importers) in PRIVATE {
                if target == *private && !importers.contains(&module.as_str()) {
                    problems.push(format!(
                        "{} imports {private}: only {} may",
                        show(&module),
                        importers.join(", ")
                    ));
                }
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    for cycle in cycles(&modules, &edges) {
        let names: Vec<&str> = cycle.iter().map(|m| show(m)).collect();
        problems.push(format!("cycle: {}", names.join(" -> ")));
    }
    problems
}

/// `module` is `place` or inside it (`""`, lib.rs, contains nothing else).
fn within(module: &str, place: &str) -> bool {
    module == place || (!place.is_empty() && module.starts_with(&format!("{place}::")))
}

/// Whether `code` has an `impl` block for type `ty` (`impl<C: Clock> Engine<C> {`).
fn implements(code: &str, ty: &str) -> bool {
    code.match_indices("impl").any(|(at, _)| {
        if at > 0 && code[..at].ends_with(is_ident) {
            return false;
        }
        let rest = code[at + 4..].trim_start();
        let rest = match rest.strip_prefix('<') {
            Some(generics) => generics.split_once('>').map_or("", |(_, r)| r).trim_start(),
            None => rest,
        };
        rest.strip_prefix(ty)
            .is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_'))
    })
}

/// The source with comments and the contents of string and char literals removed.
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&chars, i) {
            // A raw string: r"...", r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match chars.get(j) {
                    None => break,
                    Some('"') if (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    Some(_) => j += 1,
                }
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('x', '\n', '\''), or a lifetime ('a), which is kept.
            let end = if next == Some('\\') {
                (i + 2..chars.len()).find(|&j| chars[j] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    out.push_str("' '");
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The crate modules `code` (of `module`) refers to: through `use` trees and inline paths.
fn references(module: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    // Inline modules (`mod tests { ... }`) shift what `super` and `self` mean.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            depth += 1;
        } else if c == '}' {
            depth = depth.saturating_sub(1);
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
        }
        let here: Vec<String> = segments(module)
            .into_iter()
            .chain(inline.iter().map(|(m, _)| m.clone()))
            .collect();
        if !ident_before(&chars, i) && starts_word(&chars, i, "mod") {
            let rest: String = chars[i + 3..].iter().collect();
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| is_ident(*c))
                .collect();
            let after = rest.trim_start()[name.len()..].trim_start();
            if !name.is_empty() && after.starts_with('{') {
                inline.push((name, depth));
            }
        }
        if !ident_before(&chars, i) && starts_word(&chars, i, "use") {
            let end = (i..chars.len())
                .find(|&j| chars[j] == ';')
                .unwrap_or(chars.len());
            let tree: String = chars[i + 3..end].iter().collect();
            for path in expand(&tree) {
                if let Some(target) = resolve(&here, module, &path, modules) {
                    found.insert(target);
                }
            }
            i = end;
            continue;
        }
        // An inline path through a child module (`openai::unauthorized(...)`).
        if !ident_before(&chars, i) && (i == 0 || chars[i - 1] != ':') && is_ident(c) {
            let name: String = chars[i..].iter().take_while(|c| is_ident(**c)).collect();
            let child = segments(module)
                .into_iter()
                .chain([name.clone()])
                .collect::<Vec<_>>()
                .join("::");
            if chars[i + name.len()..].starts_with(&[':', ':']) && modules.contains(&child) {
                found.insert(child);
            }
        }
        for root in ["crate", "super", "self"] {
            if !ident_before(&chars, i) && starts_word(&chars, i, root) {
                let path: String = chars[i..]
                    .iter()
                    .take_while(|c| is_ident(**c) || **c == ':')
                    .collect();
                if path.contains("::") {
                    let path: Vec<String> = path
                        .split("::")
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect();
                    if let Some(target) = resolve(&here, module, &path, modules) {
                        found.insert(target);
                    }
                }
            }
        }
        i += 1;
    }
    found
}

fn starts_word(chars: &[char], i: usize, word: &str) -> bool {
    let w: Vec<char> = word.chars().collect();
    chars.len() >= i + w.len()
        && chars[i..i + w.len()] == w[..]
        && !chars.get(i + w.len()).is_some_and(|c| is_ident(*c))
}

fn segments(module: &str) -> Vec<String> {
    module
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A `use` tree as the paths it names: `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    // `x as y` names x; '@' marks the rename once whitespace is gone.
    let tree: String = tree
        .replace(" as ", "@")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let mut out = Vec::new();
    expand_into(&tree, &[], &mut out);
    out
}

fn expand_into(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    for part in split_top(tree) {
        let part = part.split('@').next().unwrap_or_default();
        let (head, group) = match part.find('{') {
            Some(open) => (&part[..open], Some(&part[open + 1..part.len() - 1])),
            None => (part, None),
        };
        let mut path = prefix.to_vec();
        path.extend(
            head.split("::")
                .filter(|s| !s.is_empty() && *s != "*")
                .map(str::to_owned),
        );
        match group {
            Some(group) => expand_into(group, &path, out),
            None => out.push(path),
        }
    }
}

/// Splits on the commas that are not inside braces.
fn split_top(tree: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in tree.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&tree[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&tree[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// The crate module `path` (as written in `here`, inside file module `module`) points into: the
/// longest prefix that is a module. `None` for paths outside the crate.
fn resolve(
    here: &[String],
    module: &str,
    path: &[String],
    modules: &BTreeSet<String>,
) -> Option<String> {
    let mut absolute: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("super") => here[..here.len().saturating_sub(1)].to_vec(),
        Some("self") => here.to_vec(),
        // A child module of this file's module, named directly (`pub use engine::Engine`).
        Some(child)
            if modules.contains(
                &segments(module)
                    .into_iter()
                    .chain([child.to_owned()])
                    .collect::<Vec<_>>()
                    .join("::"),
            ) =>
        {
            let mut p = segments(module);
            p.push(child.to_owned());
            return Some(p.join("::"));
        }
        _ => return None,
    };
    let mut rest = &path[1..];
    while rest.first().map(String::as_str) == Some("super") {
        absolute.pop();
        rest = &rest[1..];
    }
    absolute.extend(rest.iter().cloned());
    (0..=absolute.len())
        .rev()
        .map(|n| absolute[..n].join("::"))
        .find(|candidate| modules.contains(candidate))
}

/// Every strongly connected group of modules larger than one, as a walk round it.
fn cycles(
    modules: &BTreeSet<String>,
    edges: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for start in modules {
        if seen.contains(start) {
            continue;
        }
        // A path back to `start` through its successors, breadth first.
        let mut queue = std::collections::VecDeque::from([vec![start.clone()]]);
        let mut visited = BTreeSet::from([start.clone()]);
        while let Some(walk) = queue.pop_front() {
            let last = walk.last().expect("non-empty");
            for next in edges.get(last).into_iter().flatten() {
                if next == start {
                    let mut cycle = walk.clone();
                    cycle.push(start.clone());
                    seen.extend(walk.iter().cloned());
                    found.push(cycle);
                    queue.clear();
                    break;
                }
                if visited.insert(next.clone()) {
                    let mut longer = walk.clone();
                    longer.push(next.clone());
                    queue.push_back(longer);
                }
            }
        }
    }
    found
}
