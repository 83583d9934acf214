//! Shared by the test crates: reading the pass test files in `tests/passes/*.gir`.
//!
//! A file starts with comment lines: the first names the passes to run, in order, as in
//! `Pass::name()` (`// passes: cse, dce`, or `// passes: none`); the others say what the test is
//! about. Then comes a graph in the gir text form, written exactly as the printer prints it.

use std::fs;
use std::path::{Path, PathBuf};

use flashc_compiler::passes::Pass;

/// One test file: the passes to run and the graph text.
pub struct Case {
    pub passes: Vec<Pass>,
    pub ir: String,
}

pub fn folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/passes")
}

/// Every `.gir` file of the folder, sorted.
pub fn cases() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(folder())
        .expect("tests/passes exists")
        .map(|e| e.expect("readable folder").path())
        .filter(|p| p.extension().is_some_and(|x| x == "gir"))
        .collect();
    paths.sort();
    paths
}

pub fn read_case(path: &Path) -> Case {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header: Vec<&str> = text.lines().take_while(|l| l.starts_with("//")).collect();
    let names = header
        .first()
        .and_then(|l| l.strip_prefix("// passes:"))
        .unwrap_or_else(|| panic!("{}: the first line must be `// passes: ...`", path.display()));
    let passes = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != "none")
        .map(|n| Pass::parse(n).unwrap_or_else(|| panic!("{}: unknown pass `{n}`", path.display())))
        .collect();
    let ir: String = text.split_inclusive('\n').skip(header.len()).collect();
    Case { passes, ir }
}
