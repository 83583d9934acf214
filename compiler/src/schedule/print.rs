//! print: the program text form (`--emit program`): a header, one line per kernel (prep, then the
//! step), one line per buffer, the outputs, and one line per arena class. See the module doc of
//! `schedule` for an example.

use std::fmt;

use super::{ArenaClass, Buffer, BufferKind, KernelGroup, Program};
use crate::gir::Dim;

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "program @{} mode={}: {} kernels per step, {} at load",
            self.name,
            self.mode.name(),
            self.kernel_count(),
            self.prep.len()
        )?;
        writeln!(
            f,
            "memory: weights {}, prepared {}, states {}, arena {} bytes",
            self.total_bytes(BufferKind::Weight),
            self.total_bytes(BufferKind::Prepared),
            self.total_bytes(BufferKind::State),
            self.arena.size
        )?;
        if !self.prep.is_empty() {
            writeln!(f, "prep (once at load):")?;
            for k in &self.prep {
                writeln!(f, "  {k}")?;
            }
        }
        writeln!(f, "kernels (per step):")?;
        for k in &self.kernels {
            writeln!(f, "  {k}")?;
        }
        writeln!(f, "buffers:")?;
        for b in &self.buffers {
            writeln!(f, "  {b}")?;
        }
        writeln!(f, "outputs:")?;
        for (name, b) in &self.outputs {
            writeln!(f, "  {name} = {b}")?;
        }
        writeln!(f, "arena {} bytes:", self.arena.size)?;
        for c in &self.arena.classes {
            writeln!(f, "  {c}")?;
        }
        Ok(())
    }
}

impl fmt::Display for KernelGroup {
    /// `k12 = matmul %57 #2 (b55, b30) -> (b57)  matmul[m=B, n=8512, k=2048]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |ids: &[super::BufferId]| ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        write!(f, "{} = {} {}", self.id, self.name, self.node)?;
        if let Some(l) = self.layer {
            write!(f, " #{l}")?;
        }
        write!(f, " ({}) -> ({})  {}", list(&self.inputs), list(&self.outputs), self.launch)
    }
}

impl fmt::Display for Buffer {
    /// `b57 activation %57 : bf16[B, 1, 8512]  17152*B bytes  @ 4096*B  live k20..k22`, or for an
    /// alias `b58 activation %58 : bf16[B, 8512]  view of b57`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.id, self.kind.name(), self.name)?;
        if self.name != self.value.to_string() {
            write!(f, " = {}", self.value)?;
        }
        write!(f, " : {}", self.ty)?;
        if let Some(a) = self.alias {
            return write!(f, "  {} {}", if a.in_place { "update of" } else { "view of" }, a.source);
        }
        write!(f, "  {} bytes", self.bytes)?;
        if self.zeroed {
            f.write_str("  zeroed")?;
        }
        if let Some(o) = &self.offset {
            write!(f, "  @ {o}")?;
        }
        if let Some((s, e)) = self.live {
            write!(f, "  live {s}..{e}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ArenaClass {
    /// `class B*T @ 0: 3 slots [8192, 8192, 512]*B*T = 16896*B*T bytes`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.slots.len();
        write!(f, "class {} @ {}: {n} slot{} ", self.monomials, self.offset, if n == 1 { "" } else { "s" })?;
        match self.monomials.monomial_class() {
            // One monomial: print the coefficients once, then the monomial.
            Some((m, 1)) => {
                let coeffs: Vec<String> = self
                    .slots
                    .iter()
                    .map(|s| s.size.monomial_class().map_or_else(|| s.size.to_string(), |(_, c)| c.to_string()))
                    .collect();
                write!(f, "[{}]", coeffs.join(", "))?;
                if m != Dim::constant(1) {
                    write!(f, "*{m}")?;
                }
            }
            _ => {
                let sizes: Vec<String> = self.slots.iter().map(|s| format!("({})", s.size)).collect();
                write!(f, "[{}]", sizes.join(", "))?;
            }
        }
        write!(f, " = {} bytes", self.size)
    }
}
