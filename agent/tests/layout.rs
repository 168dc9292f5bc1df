//! The agent's layout, checked from its source (docs/architecture.md,
//! "Layout"): every module sits in a room, the rooms are stacked, and a
//! module names only modules of its own room or of rooms below it. Within a
//! room no two files name each other, directly or in a circle. So knowledge
//! flows one way, and nothing below `migration/` calls into it.
//!
//! What a file names: every `crate::…` path (and `pcft_agent::…` in the
//! binary's `cli/`), and every `super::…` path, in `use` trees and in code,
//! outside comments and `#[cfg(test)]` modules; each resolved to the deepest
//! module file it reaches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Rooms from the bottom up: a module in a room may name modules of its own
/// room and of rooms on lower floors only. The longest prefix wins.
const ROOMS: &[(&str, u32)] = &[
    ("clock", 0),
    ("host", 0),
    ("fault", 0),
    ("metrics", 0),
    ("vmm", 1),
    ("wire", 2),
    ("migration::error", 3),
    ("migration::progress", 3),
    ("migration::return_path", 4),
    ("migration::postcopy", 4),
    ("migration::ft", 5),
    ("migration::source", 6),
    ("migration::destination", 6),
    ("migration", 7),
    ("agent", 8),
    ("fuzzing", 9),
    ("cli", 10),
    ("", 11),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path of a source file (`vmm/dirty/mod.rs` → `vmm::dirty`; `lib.rs`, `main.rs` → ``).
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).expect("under src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code without comments, string contents and `#[cfg(test)]` items.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<usize> = None;
    let mut depth = 0usize;
    let mut pending_cfg_test = false;
    for line in text.lines() {
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        let trimmed = code.trim();
        if skip_depth.is_none() && trimmed.starts_with("#[cfg(test)]") {
            pending_cfg_test = true;
            continue;
        }
        if pending_cfg_test && !trimmed.is_empty() {
            pending_cfg_test = false;
            skip_depth = Some(depth);
        }
        let opens = code.matches('{').count();
        let closes = code.matches('}').count();
        depth = depth + opens - closes.min(depth + opens);
        if let Some(at) = skip_depth {
            // The test item ends where the depth is back to where it started
            // (or at once, for a one-line item such as `mod x;`).
            if depth <= at && (closes > 0 || trimmed.ends_with(';')) {
                skip_depth = None;
            }
            continue;
        }
        let mut in_string = false;
        for c in code.chars() {
            if c == '"' {
                in_string = !in_string;
                out.push(c);
            } else if !in_string {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into whole paths.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else { return vec![tree] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').expect("a closing brace")];
    let mut parts = Vec::new();
    let (mut level, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => level += 1,
            '}' => level -= 1,
            ',' if level == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).flat_map(expand).map(|p| format!("{prefix}{p}")).collect()
}

/// Every path the code names that starts at the crate root or at `super`.
fn named_paths(code: &str, in_binary: bool) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let statement = &rest[at + 4..];
        let end = statement.find(';').unwrap_or(statement.len());
        let before = rest[..at].chars().last();
        if before.is_none_or(|c| !c.is_alphanumeric() && c != '_') {
            paths.extend(expand(&statement[..end]));
        }
        rest = &statement[end..];
    }
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    for (i, _) in
        code.match_indices("crate::").chain(code.match_indices("super::")).chain(code.match_indices("pcft_agent::"))
    {
        if code[..i].chars().last().is_some_and(word) {
            continue;
        }
        let path: String = code[i..].chars().take_while(|&c| word(c)).collect();
        // `a::{…}` and `a::*` are `use` trees, read whole above.
        if !path.ends_with("::") {
            paths.push(path);
        }
    }
    // `use` paths may also start at a child module (`use state::X`) or at `self`.
    // `use super::*` is the idiom of a module inline in a file (its `super` is
    // the file itself, which this reading does not track): left out.
    paths.into_iter().filter(|p| (!p.starts_with("pcft_agent::") || in_binary) && p != "super::*").collect()
}

/// The module a path names, given the modules that exist.
fn resolve(path: &str, from: &str, in_binary: bool, modules: &BTreeSet<String>) -> Option<String> {
    let mut segments: Vec<&str> = path.trim_end_matches("::").split("::").collect();
    let mut base: Vec<String> = Vec::new();
    match segments.first() {
        Some(&"crate") if in_binary => base.push("cli".into()),
        Some(&"crate") => {}
        Some(&"pcft_agent") => {}
        Some(&"super") => {
            base = from.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
            while segments.first() == Some(&"super") {
                base.pop();
                segments.remove(0);
            }
            segments.insert(0, "super");
        }
        Some(&"self") => base = from.split("::").filter(|s| !s.is_empty()).map(String::from).collect(),
        Some(first) => {
            // A child module of this one (`use state::X` in fence/mod.rs), or an outside crate.
            let child = if from.is_empty() { first.to_string() } else { format!("{from}::{first}") };
            if !modules.contains(&child) {
                return None;
            }
            base = from.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
            segments.insert(0, "self");
        }
        None => return None,
    }
    segments.remove(0);
    if in_binary && segments.first() == Some(&"cli") {
        base.clear();
    }
    let mut deepest = None;
    let mut current = base.clone();
    for segment in segments {
        if segment == "*" || segment == "self" {
            break;
        }
        current.push(segment.to_string());
        let candidate = current.join("::");
        if modules.contains(&candidate) {
            deepest = Some(candidate);
        } else {
            break;
        }
    }
    deepest.or_else(|| (!base.is_empty()).then(|| base.join("::")).filter(|b| modules.contains(b)))
}

fn room_of(module: &str) -> (&'static str, u32) {
    ROOMS
        .iter()
        .filter(|(room, _)| room.is_empty() || module == *room || module.starts_with(&format!("{room}::")))
        .max_by_key(|(room, _)| room.len())
        .copied()
        .expect("the root room matches everything")
}

/// Every file's module and the modules it names (itself and its ancestors left out).
fn arrows() -> Arrows {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let modules: BTreeSet<String> = all.iter().map(|f| module_of(f)).collect();
    let mut arrows = BTreeMap::new();
    for file in &all {
        let module = module_of(file);
        let in_binary = module.starts_with("cli") || file.ends_with("main.rs");
        let module = if file.ends_with("main.rs") { "cli".to_string() } else { module };
        let text = std::fs::read_to_string(file).expect("read a source file");
        let named: BTreeSet<String> = named_paths(&code_of(&text), in_binary)
            .iter()
            .filter_map(|p| resolve(p, &module, in_binary, &modules))
            .filter(|target| *target != module && !target.is_empty())
            .collect();
        arrows.entry(module).or_insert_with(BTreeSet::new).extend(named);
    }
    arrows
}

type Arrows = BTreeMap<String, BTreeSet<String>>;

/// Every arrow from a module to one in another room on its own floor or above.
fn arrows_up(arrows: &Arrows) -> Vec<String> {
    let mut wrong = Vec::new();
    for (module, targets) in arrows {
        let (room, floor) = room_of(module);
        for target in targets {
            let (target_room, target_floor) = room_of(target);
            if target_room != room && target_floor >= floor {
                wrong.push(format!(
                    "{module} ({room}, floor {floor}) names {target} ({target_room}, floor {target_floor})"
                ));
            }
        }
    }
    wrong
}

/// Every circle of arrows, each written once from its smallest module.
fn circles(arrows: &Arrows) -> BTreeSet<String> {
    // A module in a circle reaches itself: depth-first search from each.
    let mut circles = BTreeSet::new();
    for start in arrows.keys() {
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in arrows.get(&at).into_iter().flatten() {
                if next == start {
                    let mut circle = trail.clone();
                    let min = circle.iter().enumerate().min_by_key(|(_, m)| (*m).clone()).map(|(i, _)| i).unwrap();
                    circle.rotate_left(min);
                    circles.insert(circle.join(" → "));
                } else if seen.insert(next.clone()) {
                    let mut longer = trail.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    circles
}

#[test]
fn no_module_names_a_room_above_its_own() {
    let wrong = arrows_up(&arrows());
    assert!(wrong.is_empty(), "imports that run sideways or up:\n{}", wrong.join("\n"));
}

#[test]
fn no_two_modules_name_each_other_even_in_a_circle() {
    let circles = circles(&arrows());
    assert!(
        circles.is_empty(),
        "modules that name each other:\n{}",
        circles.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_checks_see_an_import_that_runs_up_and_a_circle() {
    // The parser must be able to fail: a vmm module naming migration is caught,
    // and two modules naming each other are.
    let code = code_of("use crate::migration::{error::MigrationError, ft};\n// use crate::agent::daemon;\nfn f() { crate::wire::frame::x(); }\n#[cfg(test)]\nmod tests {\n    use crate::agent::daemon;\n}\n");
    let paths = named_paths(&code, false);
    assert!(paths.contains(&"crate::migration::error::MigrationError".to_string()), "{paths:?}");
    assert!(paths.contains(&"crate::migration::ft".to_string()), "{paths:?}");
    assert!(paths.iter().any(|p| p.starts_with("crate::wire::frame")), "{paths:?}");
    assert!(!paths.iter().any(|p| p.contains("agent")), "comments and tests are not imports: {paths:?}");
    let modules: BTreeSet<String> =
        ["migration", "migration::error", "migration::ft", "wire", "wire::frame", "vmm", "vmm::runner"]
            .map(String::from)
            .into();
    assert_eq!(
        resolve("crate::migration::error::MigrationError", "vmm::runner", false, &modules).as_deref(),
        Some("migration::error")
    );
    assert_eq!(resolve("super::runner::X", "vmm::machine", false, &modules).as_deref(), Some("vmm::runner"));
    assert_eq!(resolve("runner::X", "vmm", false, &modules).as_deref(), Some("vmm::runner"));
    assert_eq!(resolve("std::sync::Arc", "vmm", false, &modules), None);
    assert!(room_of("vmm::runner").1 < room_of("migration::error").1);

    // And the two rules catch what they are for: an arrow up, and a circle of three.
    let graph = |edges: &[(&str, &str)]| {
        let mut arrows = Arrows::new();
        for (from, to) in edges {
            arrows.entry(from.to_string()).or_default().insert(to.to_string());
        }
        arrows
    };
    let up = graph(&[("vmm::runner", "migration::error"), ("migration::error", "vmm::runner")]);
    assert_eq!(arrows_up(&up).len(), 1, "{:?}", arrows_up(&up));
    assert!(arrows_up(&graph(&[("migration::ft::store", "vmm::memory")])).is_empty());
    let circle = graph(&[("vmm::a", "vmm::b"), ("vmm::b", "vmm::c"), ("vmm::c", "vmm::a"), ("vmm::c", "vmm::d")]);
    assert_eq!(circles(&circle), BTreeSet::from(["vmm::a → vmm::b → vmm::c".to_string()]));
    assert!(circles(&graph(&[("vmm::a", "vmm::b"), ("vmm::b", "vmm::c")])).is_empty());
}
