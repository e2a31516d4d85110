//! The modules form no circle (ARCHITECTURE.md, "Module map"): data flows one way, from what
//! is observed through the pure core to the edges. Read from the source: a top-level module
//! `a` depends on `b` when code of `a` (not its comments, not its unit tests) names
//! `crate::b`. A circle fails with the lines that close it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module → the modules it names → where (file:line), first few.
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to, or `None` for test-only files.
fn module_of(relative: &Path) -> Option<String> {
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .iter()
        .any(|p| p == "tests" || p == "tests.rs" || p.ends_with("_tests.rs"))
    {
        return None;
    }
    Some(parts.first()?.trim_end_matches(".rs").to_owned())
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let Some(module) = module_of(relative) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read");
        // Unit tests may reach anywhere; they sit at the end of their file.
        let code = text
            .find("#[cfg(test)]\nmod tests")
            .map_or(text.as_str(), |at| &text[..at]);
        let edges = graph.entry(module.clone()).or_default();
        for (number, line) in code.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                let name: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    let places = edges.entry(name).or_default();
                    if places.len() < 3 {
                        places.push(format!("src/{}:{}", relative.display(), number + 1));
                    }
                }
            }
        }
    }
    graph
}

/// A path from `from` back to `to` through `graph`, if any (depth first).
fn path_back(
    graph: &Graph,
    from: &str,
    to: &str,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if from == to {
        return Some(vec![to.to_owned()]);
    }
    if !seen.insert(from.to_owned()) {
        return None;
    }
    for next in graph.get(from).into_iter().flat_map(|e| e.keys()) {
        if let Some(mut rest) = path_back(graph, next, to, seen) {
            rest.insert(0, from.to_owned());
            return Some(rest);
        }
    }
    None
}

fn circles(graph: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for (module, edges) in graph {
        for (next, places) in edges {
            if let Some(back) = path_back(graph, next, module, &mut BTreeSet::new()) {
                found.push(format!(
                    "{module} -> {} (the first step at {})",
                    back.join(" -> "),
                    places.join(", ")
                ));
            }
        }
    }
    found
}

#[test]
fn the_modules_form_no_circle() {
    let graph = graph();
    // The reader sees the modules: a broken reader would find nothing and pass.
    for module in ["daemon", "plan", "reconcile", "router", "state", "model"] {
        assert!(graph.contains_key(module), "{module} not read");
    }
    assert!(
        graph["reconcile"].contains_key("router"),
        "reconcile's use of the router not seen"
    );
    for (module, edges) in &graph {
        println!(
            "{module} -> {}",
            edges.keys().cloned().collect::<Vec<_>>().join(" ")
        );
    }
    let found = circles(&graph);
    assert!(found.is_empty(), "module circles:\n{}", found.join("\n"));
}

#[test]
fn a_circle_is_found_with_the_lines_that_close_it() {
    let mut graph = Graph::new();
    let edge = |graph: &mut Graph, a: &str, b: &str, at: &str| {
        graph
            .entry(a.into())
            .or_default()
            .insert(b.into(), vec![at.into()]);
    };
    edge(&mut graph, "plan", "state", "src/plan.rs:1");
    edge(&mut graph, "reconcile", "plan", "src/reconcile.rs:1");
    assert!(circles(&graph).is_empty());
    edge(&mut graph, "state", "reconcile", "src/state/file.rs:9");
    let found = circles(&graph);
    assert!(
        found
            .iter()
            .any(|c| c.contains("state -> reconcile -> plan -> state")
                && c.contains("src/state/file.rs:9")),
        "{found:?}"
    );
}
