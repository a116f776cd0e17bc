//! No module imports one that imports it back, directly or through others: a test over the
//! `use` declarations (and the `crate::`/`super::` paths written out in code) of every file
//! under `src/`.
//!
//! What counts as one module:
//! - `engine/` is a layer made of layers (spec, model, layers, backends, loops): each file
//!   and folder in it is a module (`engine::schedule`, `engine::spec`), and its `mod.rs` one
//!   more (`engine`). A folder in it is one module with all the files directly in it, so that
//!   a folder's `mod.rs` and its files may use each other, and each folder inside that is a
//!   module of its own (`engine::backend`, `engine::backend::native`, `engine::layers::conv`).
//! - The other top-level folders (`http/`, `store/`, `worker/`, `cli/`) are one module each:
//!   their files share their `mod.rs` (the app's state and error, the store's row types).
//! - A top-level file (`config.rs`) is a module; `lib.rs` is the crate's root.
//!
//! A parent naming the modules it declares (`pub mod native;`) is not an import; a `use` of
//! one is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A token of Rust source, as far as paths need: identifiers and punctuation, with comments,
/// string and character literals and numbers skipped.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

fn tokens(source: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if c == '"' || ((c == 'r' || c == 'b') && raw_string_start(&chars, i).is_some()) {
            let (hashes, start) = raw_string_start(&chars, i).unwrap_or((None, i + 1));
            i = start;
            while i < chars.len() {
                match (chars[i], hashes) {
                    ('\\', None) => i += 2,
                    ('"', None) => {
                        i += 1;
                        break;
                    }
                    ('"', Some(count)) if (1..=count).all(|k| at(i + k) == '#') => {
                        i += 1 + count;
                        break;
                    }
                    (other, _) => {
                        line += usize::from(other == '\n');
                        i += 1;
                    }
                }
            }
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}'), or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Token::Ident(chars[start..i].iter().collect()), line));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push((Token::PathSep, line));
            i += 2;
        } else {
            out.push((Token::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// Where a string literal starting at `i` (`"`, `r"`, `r#"`, `b"`, `br#"`) opens: its count
/// of `#` for a raw one, and the index after its opening quote.
fn raw_string_start(chars: &[char], i: usize) -> Option<(Option<usize>, usize)> {
    let mut j = i;
    if chars.get(j) == Some(&'b') {
        j += 1;
    }
    if chars.get(j) == Some(&'"') && j > i {
        return Some((None, j + 1));
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
    (chars.get(j + hashes) == Some(&'"')).then_some((Some(hashes), j + hashes + 1))
}

/// The paths a `use` tree names, each as written (`super::a::B`), from the tokens after `use`.
fn use_paths(tree: &[Token]) -> Vec<Vec<String>> {
    fn parse(
        tree: &[Token],
        mut at: usize,
        prefix: &[String],
        out: &mut Vec<Vec<String>>,
    ) -> usize {
        let mut path = prefix.to_vec();
        while at < tree.len() {
            match &tree[at] {
                Token::Ident(name) if name == "as" => {
                    at += 2;
                    break;
                }
                Token::Ident(name) => {
                    path.push(name.clone());
                    at += 1;
                }
                Token::PathSep => at += 1,
                Token::Punct('{') => {
                    at += 1;
                    while at < tree.len() && tree[at] != Token::Punct('}') {
                        at = next(tree, at, parse(tree, at, &path, out));
                    }
                    return at + 1;
                }
                _ => break,
            }
        }
        if path.len() > prefix.len() {
            // `use super::{self, X}` names the prefix itself.
            if path.last().is_some_and(|last| last == "self") {
                path.pop();
            }
            out.push(path);
        }
        at
    }
    /// Past the separator after an item that ended at `end` (a glob `*` ends before its
    /// star), and never where it started.
    fn next(tree: &[Token], start: usize, end: usize) -> usize {
        let end = if end == start { end + 1 } else { end };
        match tree.get(end) {
            Some(Token::Punct(',' | '*')) => next(tree, end, end + 1),
            _ => end,
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < tree.len() {
        at = next(tree, at, parse(tree, at, &[], &mut out));
    }
    out
}

/// A file's imports as paths from the crate root (`["engine", "spec", "JobSpec"]`), with the
/// line of each; `module` is the file's module path, `modules` every module of the crate
/// (for a `use` that starts with a child module's name).
fn imports(
    source: &str,
    module: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Vec<(Vec<String>, usize)> {
    let tokens = tokens(source);
    let mut out = Vec::new();
    // Inline modules (`mod tests { ... }`): their name and the depth their body opens at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    let resolve = |path: &[String], inline: &[(String, usize)]| -> Option<Vec<String>> {
        let mut base: Vec<String> = module.to_vec();
        base.extend(inline.iter().map(|(name, _)| name.clone()));
        let first = path.first()?;
        let (mut resolved, rest) = match first.as_str() {
            "crate" => (Vec::new(), &path[1..]),
            "self" => (base, &path[1..]),
            "super" => {
                let supers = path.iter().take_while(|s| *s == "super").count();
                base.truncate(base.len().saturating_sub(supers));
                (base, &path[supers..])
            }
            _ => {
                let mut child = base.clone();
                child.push(first.clone());
                if !modules.contains(&child) {
                    return None;
                }
                (base, path)
            }
        };
        resolved.extend(rest.iter().cloned());
        Some(resolved)
    };
    while i < tokens.len() {
        match &tokens[i].0 {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                depth -= 1;
                if inline.last().is_some_and(|(_, open)| *open == depth) {
                    inline.pop();
                }
            }
            Token::Ident(word) if word == "mod" => {
                if let (Some((Token::Ident(name), _)), Some((Token::Punct('{'), _))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Token::Ident(word) if word == "use" => {
                let line = tokens[i].1;
                let end = (i..tokens.len())
                    .find(|&j| tokens[j].0 == Token::Punct(';'))
                    .unwrap_or(tokens.len());
                let tree: Vec<Token> = tokens[i + 1..end].iter().map(|(t, _)| t.clone()).collect();
                for path in use_paths(&tree) {
                    out.extend(resolve(&path, &inline).map(|path| (path, line)));
                }
                i = end + 1;
                continue;
            }
            Token::Ident(word)
                if (word == "crate" || word == "super")
                    && tokens.get(i + 1).map(|(t, _)| t) == Some(&Token::PathSep)
                    && i.checked_sub(1).map(|j| &tokens[j].0) != Some(&Token::Punct('$')) =>
            {
                let line = tokens[i].1;
                let mut path = vec![word.clone()];
                let mut j = i + 1;
                while let (Some((Token::PathSep, _)), Some((Token::Ident(next), _))) =
                    (tokens.get(j), tokens.get(j + 1))
                {
                    path.push(next.clone());
                    j += 2;
                }
                out.extend(resolve(&path, &inline).map(|path| (path, line)));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// A source file's module path from the crate root.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib") {
        parts.push(stem.to_string());
    }
    parts
}

/// The top-level folder whose files and folders are modules of their own.
const LAYERED: &str = "engine";

/// The module (in the sense of the module docs) a file belongs to.
fn unit_of(relative: &Path) -> Vec<String> {
    let folders: Vec<String> = relative
        .parent()
        .map(|parent| {
            parent
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    match folders.first() {
        None => module_path(relative),
        Some(top) if top != LAYERED => folders[..1].to_vec(),
        Some(_) if folders.len() >= 2 => folders,
        Some(_) => module_path(relative),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Every import from one module to another: (from, to) to the file and line that makes it.
fn module_graph(src: &Path) -> BTreeMap<(Vec<String>, Vec<String>), String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    // The binary's root is a crate of its own (it reaches this one as `lrtune::`).
    files.retain(|file| file.strip_prefix(src).ok() != Some(Path::new("main.rs")));
    let relative: Vec<PathBuf> = files
        .iter()
        .map(|file| file.strip_prefix(src).expect("under src").to_path_buf())
        .collect();
    let modules: BTreeSet<Vec<String>> = relative.iter().map(|file| module_path(file)).collect();
    let units: BTreeSet<Vec<String>> = relative.iter().map(|file| unit_of(file)).collect();
    let unit_of_path = |path: &[String]| -> Vec<String> {
        (0..=path.len())
            .rev()
            .map(|len| path[..len].to_vec())
            .find(|prefix| units.contains(prefix))
            .unwrap_or_default()
    };
    let mut edges = BTreeMap::new();
    for (file, relative) in files.iter().zip(&relative) {
        let source = std::fs::read_to_string(file).expect("a source file");
        let from = unit_of(relative);
        for (path, line) in imports(&source, &module_path(relative), &modules) {
            let to = unit_of_path(&path);
            if to != from {
                edges
                    .entry((from.clone(), to))
                    .or_insert_with(|| format!("{}:{line}", relative.display()));
            }
        }
    }
    edges
}

/// The strongly connected components of more than one module (Tarjan's algorithm).
fn cycles(edges: &BTreeMap<(Vec<String>, Vec<String>), String>) -> Vec<Vec<Vec<String>>> {
    struct Search<'a> {
        next: BTreeMap<&'a Vec<String>, Vec<&'a Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        found: Vec<Vec<Vec<String>>>,
    }
    impl<'a> Search<'a> {
        fn visit(&mut self, node: &'a Vec<String>) {
            let order = self.index.len();
            self.index.insert(node, order);
            self.low.insert(node, order);
            self.stack.push(node);
            for next in self.next.get(node).cloned().unwrap_or_default() {
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.stack.contains(&next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let at = self
                    .stack
                    .iter()
                    .position(|member| *member == node)
                    .expect("on the stack");
                let component: Vec<Vec<String>> = self
                    .stack
                    .drain(at..)
                    .map(|member| member.to_vec())
                    .collect();
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut search = Search {
        next: BTreeMap::new(),
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for (from, to) in edges.keys() {
        search.next.entry(from).or_default().push(to);
    }
    let nodes: Vec<&Vec<String>> = search.next.keys().copied().collect();
    for node in nodes {
        if !search.index.contains_key(node) {
            search.visit(node);
        }
    }
    search.found
}

fn name(unit: &[String]) -> String {
    if unit.is_empty() {
        "crate".to_string()
    } else {
        unit.join("::")
    }
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = module_graph(&src);
    let found = cycles(&edges);
    let report: Vec<String> = found
        .iter()
        .map(|component| {
            let members: BTreeSet<&Vec<String>> = component.iter().collect();
            let inside: Vec<String> = edges
                .iter()
                .filter(|((from, to), _)| members.contains(from) && members.contains(to))
                .map(|((from, to), at)| format!("  {} -> {} ({at})", name(from), name(to)))
                .collect();
            format!(
                "a cycle through {}:\n{}",
                component
                    .iter()
                    .map(|unit| name(unit))
                    .collect::<Vec<_>>()
                    .join(", "),
                inside.join("\n")
            )
        })
        .collect();
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn the_scanner_reads_use_trees_inline_paths_and_inline_modules() {
    let modules: BTreeSet<Vec<String>> = [vec!["engine".to_string(), "data".to_string()]]
        .into_iter()
        .collect();
    let module = vec!["engine".to_string()];
    let source = r#"
        // use crate::in_a_comment::X;
        use super::{self, spec::{JobSpec, layers::LayerSpec as Spec}, json};
        use data::Task;
        use std::fmt;
        const TEXT: &str = "crate::in_a_string::X";
        fn f<'a>(x: &'a str) -> char { let _ = crate::engine::quote::bounded(x); '"' }
        mod tests {
            use super::*;
            use crate::engine::rng::Rng;
        }
        impl super::Backend for X {}
    "#;
    let found: Vec<String> = imports(source, &module, &modules)
        .into_iter()
        .map(|(path, _)| path.join("::"))
        .collect();
    assert_eq!(
        found,
        [
            "",
            "spec::JobSpec",
            "spec::layers::LayerSpec",
            "json",
            "engine::data::Task",
            "engine::quote::bounded",
            "engine",
            "engine::rng::Rng",
            "Backend",
        ]
    );
}
