//! diag: the one diagnostic type for user errors across flashc, and its renderer.
//!
//! Every user-facing error has a stable code (`E0104`), a message, labelled source spans and, where we
//! can say something useful, a `help:` line. Rendering happens only here (rustc style, via
//! codespan-reporting with ASCII characters) so every stage reports errors the same way.

use std::fmt;
use std::ops::Range;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term;
use serde::{Deserialize, Serialize};

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }

    pub fn range(self) -> Range<usize> {
        self.start..self.end
    }
}

/// How bad a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    Error,
    Warning,
}

macro_rules! codes {
    ($($name:ident = $code:literal : $summary:literal,)*) => {
        /// Stable diagnostic codes. Each has a one-line summary (`flashc explain CODE`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum Code { $($name,)* }

        impl Code {
            /// The code as printed, e.g. `E0104`.
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$name => $code,)* }
            }

            /// One line saying what the code means.
            pub fn summary(self) -> &'static str {
                match self { $(Code::$name => $summary,)* }
            }

            /// Every code, in order.
            pub const ALL: &'static [Code] = &[$(Code::$name,)*];
        }
    };
}

codes! {
    // Reading and parsing.
    Syntax = "E0001": "the text is not valid .arch syntax",
    NotUtf8 = "E0002": "the file is not valid UTF-8 text",
    TooDeep = "E0003": "expressions or lists are nested too deeply",
    TooLarge = "E0004": "the file is too large",
    NoModel = "E0005": "the file defines no model, or more than one",
    // Operators and parameters.
    UnknownOperator = "E0101": "unknown operator kind",
    UnknownParam = "E0102": "unknown parameter",
    DuplicateParam = "E0103": "a parameter is given twice",
    MissingParam = "E0104": "a required parameter is missing",
    WrongType = "E0105": "a value has the wrong type",
    PositionalArg = "E0106": "operator and option parameters must be named",
    ConflictingParams = "E0107": "two parameters that exclude each other are both given",
    BadEnumValue = "E0108": "a value is not one of the allowed words",
    // Names and arithmetic.
    UndefinedName = "E0201": "a name is used but never defined",
    CyclicBinding = "E0202": "bindings depend on each other in a cycle",
    DivisionByZero = "E0203": "division by zero",
    NotInteger = "E0204": "a non-integer value where an integer is required",
    Overflow = "E0205": "a number or result is too large",
    DuplicateDefinition = "E0206": "a name is defined twice",
    BadOperands = "E0207": "arithmetic on values that do not support it",
    ReservedName = "E0208": "a binding uses a reserved name",
    // Model structure and shapes.
    UnknownSetting = "E0301": "unknown model setting",
    DuplicateSetting = "E0302": "a model setting is given twice",
    MissingSetting = "E0303": "a required model setting is missing",
    OutOfRange = "E0304": "a value is outside its allowed range",
    ShapeMismatch = "E0305": "sizes do not divide as the operator requires",
    KvHeads = "E0306": "kv_heads does not divide heads",
    EmptyStack = "E0307": "the layer stack is empty",
    UnknownBlock = "E0308": "a name in a block or the layer stack is not an op or a block",
    RecursiveBlock = "E0309": "blocks contain each other",
    StackTooLarge = "E0310": "the layer stack is too large",
    NotALayer = "E0311": "a value in a block or layer list is not an operator",
    UnknownSection = "E0312": "unknown section",
    // Warnings.
    UnusedBinding = "W0001": "a binding, op or block is never used",
    DecayWithWeightNorm = "W0002": "weight decay is combined with weight normalisation",
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A labelled span inside a diagnostic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub span: Span,
    pub message: String,
    /// Primary labels are drawn with `^`, secondary ones with `-`.
    pub primary: bool,
}

/// A user-facing error or warning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: Code,
    pub message: String,
    pub labels: Vec<Label>,
    pub help: Option<String>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    /// An error whose primary label is `span`.
    pub fn error(code: Code, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            labels: vec![Label { span, message: String::new(), primary: true }],
            help: None,
            notes: Vec::new(),
        }
    }

    /// An error about the file as a whole, shown without a source excerpt.
    pub fn global(code: Code, message: impl Into<String>) -> Diagnostic {
        Diagnostic { labels: Vec::new(), ..Diagnostic::error(code, Span::default(), message) }
    }

    /// A warning whose primary label is `span`.
    pub fn warning(code: Code, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(code, span, message) }
    }

    /// Sets the text of the primary label.
    pub fn with_label(mut self, message: impl Into<String>) -> Diagnostic {
        if let Some(first) = self.labels.first_mut() {
            first.message = message.into();
        }
        self
    }

    /// Adds a secondary label.
    pub fn with_secondary(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.labels.push(Label { span, message: message.into(), primary: false });
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The primary span (the first label's).
    pub fn span(&self) -> Span {
        self.labels.first().map(|l| l.span).unwrap_or_default()
    }
}

/// Whether any of `diags` is an error.
pub fn has_errors(diags: &[Diagnostic]) -> bool {
    diags.iter().any(Diagnostic::is_error)
}

/// Renders diagnostics like rustc (`error[E0104]: ...`, `--> file:line:col`, labels, `= help:`).
/// Output is plain text (no colour), identical on every machine.
pub fn render(file_name: &str, source: &str, diags: &[Diagnostic]) -> String {
    let file = SimpleFile::new(file_name, source);
    let config = term::Config { chars: term::Chars::ascii(), ..term::Config::default() };
    let mut out = String::new();
    for d in diags {
        let mut cd = match d.severity {
            Severity::Error => cs::Diagnostic::error(),
            Severity::Warning => cs::Diagnostic::warning(),
        }
        .with_code(d.code.as_str())
        .with_message(&d.message);
        let len = source.len();
        // Labels are clamped to the source so a diagnostic can never make the renderer fail.
        let clamp = |s: Span| {
            let start = floor_char_boundary(source, s.start.min(len));
            let end = floor_char_boundary(source, s.end.clamp(start, len));
            start..end
        };
        cd = cd.with_labels(
            d.labels
                .iter()
                .map(|l| {
                    let lab = if l.primary {
                        cs::Label::primary((), clamp(l.span))
                    } else {
                        cs::Label::secondary((), clamp(l.span))
                    };
                    lab.with_message(&l.message)
                })
                .collect(),
        );
        let mut notes: Vec<String> = d.notes.iter().map(|n| format!("note: {n}")).collect();
        if let Some(h) = &d.help {
            notes.push(format!("help: {h}"));
        }
        cd = cd.with_notes(notes);
        match term::emit_into_string(&config, &file, &cd) {
            Ok(s) => out.push_str(&s),
            Err(e) => {
                out.push_str(&format!("{}[{}]: {} (could not show source: {e})\n", severity_word(d), d.code, d.message))
            }
        }
    }
    out
}

fn severity_word(d: &Diagnostic) -> &'static str {
    match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The candidate closest to `name`, if it is close enough to be a plausible typo: edit distance with
/// transpositions, at most a third of the length (names of one or two characters only match when
/// they differ in case), ties broken in favour of candidates that extend the name (`relu` → `relu2`).
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<((usize, bool, &str), &str)> = None;
    for c in candidates {
        let d = edit_distance(&name.to_lowercase(), &c.to_lowercase());
        let len = name.chars().count().max(c.chars().count());
        let limit = if len <= 2 { 0 } else { (len / 3).max(1) };
        if d > limit || c == name {
            continue;
        }
        let key = (d, !(c.starts_with(name) || name.starts_with(c)), c);
        if best.is_none_or(|(k, _)| key < k) {
            best = Some((key, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal-string-alignment distance over chars: insertions, deletions, substitutions and swaps of
/// adjacent characters each cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1).min(d[i * w + j - 1] + 1).min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("kv_head", ["heads", "kv_heads", "head_dim"]), Some("kv_heads"));
        assert_eq!(did_you_mean("zzz", ["heads", "kv_heads"]), None);
        assert_eq!(did_you_mean("widht", ["width", "window"]), Some("width"));
        assert_eq!(did_you_mean("relu", ["swiglu", "relu2", "gelu"]), Some("relu2"));
        assert_eq!(did_you_mean("Q", ["A", "F"]), None);
    }

    #[test]
    fn codes_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "duplicate code {c}");
        }
    }

    #[test]
    fn renders_like_rustc() {
        let src = "model m {\n  vocab = x\n}\n";
        let d = Diagnostic::error(Code::UndefinedName, Span::new(20, 21), "cannot find `x`")
            .with_label("not defined")
            .with_help("define it with `let x = ...`");
        let out = render("m.arch", src, &[d]);
        assert!(out.starts_with("error[E0201]: cannot find `x`\n"), "{out}");
        assert!(out.contains("--> m.arch:2:11"), "{out}");
        assert!(out.contains("= help: define it"), "{out}");
        // Out-of-range spans are clamped, not a panic.
        let d = Diagnostic::error(Code::Syntax, Span::new(500, 900), "x");
        assert!(render("m.arch", src, &[d]).contains("error[E0001]"));
    }
}
