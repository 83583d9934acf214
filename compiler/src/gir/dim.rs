//! dim: symbolic sizes. A `Dim` is a polynomial with integer coefficients over the runtime symbols
//! `B` (sequences in the batch), `T` (new tokens per sequence) and `S` (cached tokens per sequence).
//!
//! Shapes, buffer sizes and arena offsets are all `Dim`s, so a program is compiled once and evaluated
//! for any batch and length. The representation is canonical (sorted monomials, no zero
//! coefficients), so structural equality is semantic equality and printing is deterministic.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A runtime size symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Sym {
    /// Sequences in the batch.
    B,
    /// New tokens per sequence in this call (1 in decode).
    T,
    /// Cached tokens per sequence (the KV-cache length before this call).
    S,
}

impl Sym {
    pub const ALL: [Sym; 3] = [Sym::B, Sym::T, Sym::S];

    pub fn name(self) -> char {
        match self {
            Sym::B => 'B',
            Sym::T => 'T',
            Sym::S => 'S',
        }
    }
}

/// Values for the symbols, for evaluating a `Dim`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bindings {
    pub b: i64,
    pub t: i64,
    pub s: i64,
}

impl Bindings {
    pub fn get(&self, s: Sym) -> i64 {
        match s {
            Sym::B => self.b,
            Sym::T => self.t,
            Sym::S => self.s,
        }
    }
}

/// A monomial: the power of each symbol (B, T, S).
type Mono = [u8; 3];

/// A polynomial in B, T, S with integer coefficients. Serialises as its printed form (`2048*B*T`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Dim {
    /// Monomial → coefficient; never holds a zero coefficient.
    terms: BTreeMap<Mono, i64>,
}

impl Dim {
    pub fn constant(c: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if c != 0 {
            terms.insert([0, 0, 0], c);
        }
        Dim { terms }
    }

    pub fn sym(s: Sym) -> Dim {
        let mut m = [0u8; 3];
        m[s as usize] = 1;
        Dim { terms: BTreeMap::from([(m, 1)]) }
    }

    /// The constant value, if the polynomial has no symbols.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&[0, 0, 0]).copied(),
            _ => None,
        }
    }

    pub fn is_zero(&self) -> bool {
        self.terms.is_empty()
    }

    /// Whether the polynomial mentions `s`.
    pub fn has(&self, s: Sym) -> bool {
        self.terms.keys().any(|m| m[s as usize] > 0)
    }

    pub fn add(&self, other: &Dim) -> Dim {
        let mut terms = self.terms.clone();
        for (m, c) in &other.terms {
            let e = terms.entry(*m).or_insert(0);
            *e = e.saturating_add(*c);
            if *e == 0 {
                terms.remove(m);
            }
        }
        Dim { terms }
    }

    pub fn sub(&self, other: &Dim) -> Dim {
        self.add(&other.scale(-1))
    }

    pub fn scale(&self, k: i64) -> Dim {
        if k == 0 {
            return Dim::default();
        }
        Dim { terms: self.terms.iter().map(|(m, c)| (*m, c.saturating_mul(k))).collect() }
    }

    pub fn mul(&self, other: &Dim) -> Dim {
        let mut out = Dim::default();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &other.terms {
                let m = [ma[0] + mb[0], ma[1] + mb[1], ma[2] + mb[2]];
                out = out.add(&Dim { terms: BTreeMap::from([(m, ca.saturating_mul(*cb))]) });
            }
        }
        out
    }

    /// Exact division by a constant, if every coefficient divides.
    pub fn div_exact(&self, k: i64) -> Option<Dim> {
        if k == 0 || self.terms.values().any(|c| c % k != 0) {
            return None;
        }
        Some(Dim { terms: self.terms.iter().map(|(m, c)| (*m, c / k)).collect() })
    }

    /// The product of several dims (1 for none).
    pub fn product<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Dim {
        dims.into_iter().fold(Dim::constant(1), |acc, d| acc.mul(d))
    }

    /// Evaluates with concrete symbol values (saturating).
    pub fn eval(&self, b: &Bindings) -> i64 {
        let mut total: i64 = 0;
        for (m, c) in &self.terms {
            let mut v = *c;
            for s in Sym::ALL {
                for _ in 0..m[s as usize] {
                    v = v.saturating_mul(b.get(s));
                }
            }
            total = total.saturating_add(v);
        }
        total
    }

    /// The monomial part (coefficient dropped) when the polynomial is a single term: used to group
    /// buffers whose sizes scale the same way.
    pub fn monomial_class(&self) -> Option<(Dim, i64)> {
        if self.terms.len() != 1 {
            return None;
        }
        let (m, c) = self.terms.iter().next()?;
        Some((Dim { terms: BTreeMap::from([(*m, 1)]) }, *c))
    }

    /// The terms as `(monomial with coefficient 1, coefficient)`, in printed order (highest degree
    /// first).
    pub fn terms(&self) -> Vec<(Dim, i64)> {
        let mut terms: Vec<(&Mono, &i64)> = self.terms.iter().collect();
        terms.sort_by(|(ma, _), (mb, _)| degree(mb).cmp(&degree(ma)).then_with(|| mb.cmp(ma)));
        terms.into_iter().map(|(m, c)| (Dim { terms: BTreeMap::from([(*m, 1)]) }, *c)).collect()
    }

    /// Whether every coefficient is non-negative (so the value is ≥ 0 for all non-negative symbols).
    pub fn is_nonneg(&self) -> bool {
        self.terms.values().all(|c| *c >= 0)
    }

    /// Whether the value is ≥ 0 for every batch and token count ≥ 1 and every cache length ≥ 0 (a
    /// sufficient check: after substituting `B = 1 + b`, `T = 1 + t`, every coefficient is ≥ 0). So
    /// `T - 1` is non-negative, `S - 1` is not.
    pub fn is_nonneg_at_runtime(&self) -> bool {
        let mut shifted = Dim::default();
        for (m, c) in &self.terms {
            // c·(1 + b)^i·(1 + t)^j·S^k, expanded with binomial coefficients.
            let mut acc = Dim::constant(*c);
            for (sym, power) in [(Sym::B, m[0]), (Sym::T, m[1])] {
                let mut expanded = Dim::default();
                for r in 0..=power {
                    let coef = binomial(power, r);
                    let mut mono = [0u8; 3];
                    mono[sym as usize] = r;
                    expanded = expanded.add(&Dim { terms: BTreeMap::from([(mono, coef)]) });
                }
                acc = acc.mul(&expanded);
            }
            for _ in 0..m[2] {
                acc = acc.mul(&Dim::sym(Sym::S));
            }
            shifted = shifted.add(&acc);
        }
        shifted.is_nonneg()
    }

    /// Parses the printed form (`2048`, `B*T`, `T + 256`, `2*B*S - 1`).
    pub fn parse(text: &str) -> Result<Dim, String> {
        let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if t.is_empty() {
            return Err("empty size".to_string());
        }
        let mut out = Dim::default();
        let mut sign = 1i64;
        let mut term = String::new();
        let flush = |term: &str, sign: i64, out: &mut Dim| -> Result<(), String> {
            if term.is_empty() {
                return Err(format!("missing term in `{text}`"));
            }
            let mut d = Dim::constant(sign);
            for factor in term.split('*') {
                let f = match factor {
                    "B" => Dim::sym(Sym::B),
                    "T" => Dim::sym(Sym::T),
                    "S" => Dim::sym(Sym::S),
                    n => Dim::constant(n.parse::<i64>().map_err(|_| format!("bad size factor `{n}` in `{text}`"))?),
                };
                d = d.mul(&f);
            }
            *out = out.add(&d);
            Ok(())
        };
        for (i, ch) in t.chars().enumerate() {
            if (ch == '+' || ch == '-') && i > 0 {
                flush(&term, sign, &mut out)?;
                term.clear();
                sign = if ch == '-' { -1 } else { 1 };
            } else if ch == '-' && i == 0 {
                sign = -1;
            } else {
                term.push(ch);
            }
        }
        flush(&term, sign, &mut out)?;
        Ok(out)
    }
}

fn degree(m: &Mono) -> u32 {
    m.iter().map(|x| u32::from(*x)).sum()
}

fn binomial(n: u8, k: u8) -> i64 {
    (0..k).fold(1i64, |acc, i| acc * i64::from(n - i) / i64::from(i + 1))
}

impl From<i64> for Dim {
    fn from(c: i64) -> Dim {
        Dim::constant(c)
    }
}

impl From<u64> for Dim {
    fn from(c: u64) -> Dim {
        Dim::constant(i64::try_from(c).unwrap_or(i64::MAX))
    }
}

impl From<Sym> for Dim {
    fn from(s: Sym) -> Dim {
        Dim::sym(s)
    }
}

impl fmt::Display for Dim {
    /// Highest-degree terms first, symbols in B, T, S order: `2*B*T + B + 3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        let mut terms: Vec<(&Mono, &i64)> = self.terms.iter().collect();
        terms.sort_by(|(ma, _), (mb, _)| degree(mb).cmp(&degree(ma)).then_with(|| mb.cmp(ma)));
        for (i, (m, c)) in terms.iter().enumerate() {
            let c = **c;
            let mag = c.unsigned_abs();
            if i == 0 {
                if c < 0 {
                    f.write_str("-")?;
                }
            } else {
                f.write_str(if c < 0 { " - " } else { " + " })?;
            }
            let mut parts: Vec<String> = Vec::new();
            let is_const = m.iter().all(|p| *p == 0);
            if mag != 1 || is_const {
                parts.push(mag.to_string());
            }
            for s in Sym::ALL {
                for _ in 0..m[s as usize] {
                    parts.push(s.name().to_string());
                }
            }
            f.write_str(&parts.join("*"))?;
        }
        Ok(())
    }
}

impl Serialize for Dim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dim {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dim, D::Error> {
        Dim::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_printing() {
        let b = Dim::sym(Sym::B);
        let t = Dim::sym(Sym::T);
        let d = b.mul(&t).scale(2048).add(&b).add(&Dim::constant(3));
        assert_eq!(d.to_string(), "2048*B*T + B + 3");
        assert_eq!(Dim::parse(&d.to_string()).unwrap(), d);
        assert_eq!(Dim::parse("T + 256").unwrap().to_string(), "T + 256");
        assert_eq!(Dim::parse("-S + 1").unwrap().to_string(), "-S + 1");
        assert_eq!(t.sub(&t), Dim::constant(0));
        assert_eq!(d.eval(&Bindings { b: 2, t: 3, s: 0 }), 2048 * 6 + 2 + 3);
        assert_eq!(Dim::constant(0).to_string(), "0");
        assert!(Dim::parse("B*x").is_err());
        assert_eq!(b.mul(&t).scale(4).div_exact(2).unwrap().to_string(), "2*B*T");
        assert!(b.scale(3).div_exact(2).is_none());
        assert!(Dim::parse("T - 1").unwrap().is_nonneg_at_runtime());
        assert!(Dim::parse("B*T - B").unwrap().is_nonneg_at_runtime());
        assert!(!Dim::parse("S - 1").unwrap().is_nonneg_at_runtime());
        assert!(!Dim::parse("T - 2").unwrap().is_nonneg_at_runtime());
    }
}
