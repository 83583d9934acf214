//! ast: the syntax tree of an `.arch` file, exactly as written (with spans).
//!
//! The tree keeps what a formatter needs (number literals as written, parentheses) and nothing is
//! evaluated or checked here beyond syntax; the resolver gives it meaning.

use serde::Serialize;

use crate::diag::Span;

/// A whole `.arch` file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct File {
    pub models: Vec<Model>,
}

/// `model NAME { items }`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Model {
    pub name: Ident,
    pub items: Vec<Item>,
    pub span: Span,
}

/// A name with its span.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// One statement inside a model or a section.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Item {
    pub kind: ItemKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// `let NAME = expr`: a named value usable in later expressions.
    Let { name: Ident, value: Expr },
    /// `op NAME = expr`: a named operator.
    Op { name: Ident, value: Expr },
    /// `block NAME = expr`: a named sequence of operators and blocks.
    Block { name: Ident, value: Expr },
    /// `KEY = expr`: a setting of the enclosing model or section (`layers = ...` included).
    Setting { key: Ident, value: Expr },
    /// `NAME { items }`: a section such as `train { ... }`.
    Section { name: Ident, items: Vec<Item> },
}

impl ItemKind {
    /// The keyword that introduces the item (`""` for settings and sections).
    pub fn keyword(&self) -> &'static str {
        match self {
            ItemKind::Let { .. } => "let",
            ItemKind::Op { .. } => "op",
            ItemKind::Block { .. } => "block",
            ItemKind::Setting { .. } | ItemKind::Section { .. } => "",
        }
    }
}

/// An expression with its span.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExprKind {
    /// A number literal as written (underscores and exponent kept).
    Number(String),
    Bool(bool),
    /// A string literal without its quotes.
    Str(String),
    /// A reference to a binding, or a bare word such as `swiglu`.
    Name(Ident),
    /// `callee(name = value, ...)`.
    Call {
        callee: Ident,
        args: Vec<Arg>,
    },
    /// `[a, b, ...]`.
    List(Vec<Expr>),
    /// `lhs op rhs`.
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// `-expr`.
    Neg(Box<Expr>),
    /// `(expr)`, kept so formatting preserves the author's grouping.
    Paren(Box<Expr>),
}

/// One argument of a call; `name` is `None` for a positional argument.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

/// Binary operators, from loosest to tightest: `++`, then `+ -`, then `* /`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BinOp {
    Concat,
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Concat => "++",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }

    /// Binding strength: higher binds tighter.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Concat => 1,
            BinOp::Add | BinOp::Sub => 2,
            BinOp::Mul | BinOp::Div => 3,
        }
    }
}
