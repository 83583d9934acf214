//! num: the bit-exact scalar arithmetic of the sim — conversions between f64/f32 and the 16-bit float
//! formats with round-to-nearest-even, and the per-type semantics of kir's `BinOp`, `UnOp`, `Cmp` and
//! `Cvt` on 64-bit register bit patterns.
//!
//! Conventions:
//! - a register holds a value in its low `ty.bytes()` bytes, the rest zero; signed integers are
//!   sign-extended when read;
//! - f32 ops are IEEE single precision with round-to-nearest-even (`add.rn`, `mul.rn`, `fma.rn`,
//!   `div.rn`, `sqrt.rn`, `rcp.rn`); f64 likewise in double precision;
//! - bf16 and f16 ops (scalar and the packed `x2` forms, per half) are computed in f32 and rounded once
//!   to the 16-bit format: exact for add, sub, mul, min, max (f32 has more than 2p+2 bits for both
//!   formats, so the double rounding is innocuous); `fma` is computed in f64 and then rounded;
//! - the `.approx` ops (`ex2`, `lg2`, `rsqrt`, `rcp.approx`, `tanh`) are computed in f64 and rounded to
//!   f32, i.e. (almost always) correctly rounded; real hardware differs by up to about 2 ulp. Their
//!   `.ftz` forms flush subnormal inputs and results to sign-preserving zero (`tanh.approx` has no
//!   `.ftz`). No other op flushes subnormals;
//! - NaN results of 16-bit conversions are the canonical NaN `0x7FFF` (what the hardware produces).

use flashc_codegen::kir::print::{bin_name, un_name};
use flashc_codegen::kir::{BinOp, Cmp, Round, Ty, UnOp};

/// Canonical 16-bit NaN (bf16 and f16).
const NAN16: u16 = 0x7FFF;

/// Rounds `x` to the nearest value of a binary floating-point format with `man_bits` stored mantissa
/// bits and `exp_bits` exponent bits (ties to even), and returns its encoding. Handles subnormals,
/// overflow to infinity and NaN (canonical `0x7FFF…`).
fn round_to_format(x: f64, man_bits: u32, exp_bits: u32) -> u64 {
    let width = 1 + exp_bits + man_bits;
    let sign = u64::from(x.is_sign_negative()) << (width - 1);
    let exp_all = (1u64 << exp_bits) - 1;
    if x.is_nan() {
        return (1u64 << (width - 1)) - 1;
    }
    if x.is_infinite() {
        return sign | (exp_all << man_bits);
    }
    let ax = x.abs();
    let bits = ax.to_bits();
    let e64 = ((bits >> 52) & 0x7FF) as i32;
    if e64 == 0 {
        // Zero or an f64 subnormal: far below the smallest subnormal of any 16- or 32-bit format.
        return sign;
    }
    let e = e64 - 1023;
    let bias = (1i32 << (exp_bits - 1)) - 1;
    let emin = 1 - bias;
    // The spacing of representable values around `ax` (subnormal spacing below the normal range).
    let mut qexp = e.max(emin) - man_bits as i32;
    let q = ax * pow2(-qexp);
    let mut n = q.round_ties_even() as u64;
    if n == 0 {
        return sign;
    }
    let p = man_bits + 1;
    while n >= 1u64 << p {
        n >>= 1;
        qexp += 1;
    }
    if n < 1u64 << man_bits {
        // Subnormal (only possible at the subnormal spacing).
        return sign | n;
    }
    let exp_field = qexp + man_bits as i32 + bias;
    if exp_field >= exp_all as i32 {
        return sign | (exp_all << man_bits);
    }
    sign | ((exp_field as u64) << man_bits) | (n - (1u64 << man_bits))
}

/// 2^k as an f64, for k in the normal range.
fn pow2(k: i32) -> f64 {
    f64::from_bits(((1023 + k.clamp(-1022, 1023)) as u64) << 52)
}

/// Decodes a binary floating-point encoding (exactly, into f64).
fn decode_format(bits: u64, man_bits: u32, exp_bits: u32) -> f64 {
    let width = 1 + exp_bits + man_bits;
    let neg = (bits >> (width - 1)) & 1 == 1;
    let exp_all = (1u64 << exp_bits) - 1;
    let e = (bits >> man_bits) & exp_all;
    let m = bits & ((1u64 << man_bits) - 1);
    let bias = (1i32 << (exp_bits - 1)) - 1;
    let v = if e == exp_all {
        if m == 0 { f64::INFINITY } else { f64::NAN }
    } else if e == 0 {
        m as f64 * pow2(1 - bias - man_bits as i32)
    } else {
        (m | (1u64 << man_bits)) as f64 * pow2(e as i32 - bias - man_bits as i32)
    };
    if neg { -v } else { v }
}

/// f32 → bf16 bits, round to nearest even (NaN → canonical NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return NAN16;
    }
    // Add half an ulp, plus one if the kept part is odd (ties to even); carries propagate into the
    // exponent, which also gives the correct overflow to infinity.
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7FFF + lsb) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f64 → bf16 bits, round to nearest even (a single rounding).
pub fn f64_to_bf16(x: f64) -> u16 {
    if x.is_nan() {
        return NAN16;
    }
    round_to_format(x, 7, 8) as u16
}

/// f64 → f16 bits, round to nearest even.
pub fn f64_to_f16(x: f64) -> u16 {
    if x.is_nan() {
        return NAN16;
    }
    round_to_format(x, 10, 5) as u16
}

/// f32 → f16 bits, round to nearest even.
pub fn f32_to_f16(x: f32) -> u16 {
    f64_to_f16(f64::from(x))
}

/// f16 bits → f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    decode_format(u64::from(h), 10, 5) as f32
}

/// f64 → f32 round to nearest even (Rust's `as` conversion is exactly that).
fn f64_to_f32(x: f64) -> f32 {
    x as f32
}

/// Flushes an f32 subnormal to a sign-preserving zero (`.ftz`).
pub fn ftz(x: f32) -> f32 {
    if x.is_subnormal() { f32::from_bits(x.to_bits() & 0x8000_0000) } else { x }
}

/// The width in bits of a type's value in a register.
pub fn width(ty: Ty) -> u32 {
    ty.bytes() * 8
}

/// The bit mask of a type's value.
#[inline]
pub fn mask(ty: Ty) -> u64 {
    match ty {
        Ty::Pred => 1,
        _ if ty.bytes() == 8 => u64::MAX,
        _ => (1u64 << width(ty)) - 1,
    }
}

/// How a type's bits are interpreted by arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Pred,
    /// An integer of `bits` bits (b-types are unsigned).
    Int {
        bits: u32,
        signed: bool,
    },
    F16,
    Bf16,
    F16x2,
    Bf16x2,
    F32,
    F64,
}

pub fn class(ty: Ty) -> Class {
    match ty {
        Ty::Pred => Class::Pred,
        Ty::F16 => Class::F16,
        Ty::Bf16 => Class::Bf16,
        Ty::F16x2 => Class::F16x2,
        Ty::Bf16x2 => Class::Bf16x2,
        Ty::F32 => Class::F32,
        Ty::F64 => Class::F64,
        _ => Class::Int { bits: width(ty), signed: ty.is_signed() },
    }
}

/// An integer register value extended to i128 (signed or unsigned by its type).
fn ext(v: u64, bits: u32, signed: bool) -> i128 {
    let v = if bits == 64 { v } else { v & ((1u64 << bits) - 1) };
    if signed && bits < 64 {
        let shift = 64 - bits;
        i128::from(((v << shift) as i64) >> shift)
    } else if signed {
        i128::from(v as i64)
    } else {
        i128::from(v)
    }
}

/// The low `bits` bits of an i128 result.
fn wrap(v: i128, bits: u32) -> u64 {
    let v = v as u64;
    if bits == 64 { v } else { v & ((1u64 << bits) - 1) }
}

/// Why a scalar operation failed.
#[derive(Clone, Debug, PartialEq)]
pub enum NumError {
    DivisionByZero,
    /// The operation is not defined for the type (PTX has no such instruction).
    Unsupported(String),
}

fn unsupported(what: &str, ty: Ty) -> NumError {
    NumError::Unsupported(format!("{what} is not defined for .{}", ty.name()))
}

/// A 16-bit float format: decode and round.
#[derive(Clone, Copy)]
enum Half {
    F16,
    Bf16,
}

impl Half {
    fn to_f32(self, h: u16) -> f32 {
        match self {
            Half::F16 => f16_to_f32(h),
            Half::Bf16 => bf16_to_f32(h),
        }
    }

    fn round_f32(self, x: f32) -> u16 {
        match self {
            Half::F16 => f32_to_f16(x),
            Half::Bf16 => f32_to_bf16(x),
        }
    }

    fn round_f64(self, x: f64) -> u16 {
        match self {
            Half::F16 => f64_to_f16(x),
            Half::Bf16 => f64_to_bf16(x),
        }
    }
}

/// Applies an f32 operation to each 16-bit lane of a half or packed-half value, rounding each result.
fn per_half(v: &[u64], lanes: u32, fmt: Half, f: impl Fn(&[f32]) -> f32) -> u64 {
    let mut out = 0u64;
    for lane in 0..lanes {
        let xs: Vec<f32> = v.iter().map(|x| fmt.to_f32((x >> (16 * lane)) as u16)).collect();
        out |= u64::from(fmt.round_f32(f(&xs))) << (16 * lane);
    }
    out
}

/// `min`/`max` of PTX floats: a NaN operand yields the other operand; −0 orders below +0.
fn fminmax(a: f64, b: f64, max: bool) -> f64 {
    if a.is_nan() {
        return b;
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        // Equal values differ only in the sign of zero.
        let neg = if max {
            a.is_sign_negative() && b.is_sign_negative()
        } else {
            a.is_sign_negative() || b.is_sign_negative()
        };
        return if neg { -a.abs() } else { a.abs() };
    }
    if (a < b) != max { a } else { b }
}

fn f32_bin(op: BinOp, a: f32, b: f32, ty: Ty) -> Result<f32, NumError> {
    Ok(match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div => a / b,
        BinOp::Min => fminmax(f64::from(a), f64::from(b), false) as f32,
        BinOp::Max => fminmax(f64::from(a), f64::from(b), true) as f32,
        _ => return Err(unsupported(bin_name(op), ty)),
    })
}

/// `op.ty a, b` on register bits. For `shl`/`shr`, `b` is the shift amount read as `.u32`.
pub fn bin(op: BinOp, ty: Ty, a: u64, b: u64) -> Result<u64, NumError> {
    match class(ty) {
        Class::Pred => match op {
            BinOp::And => Ok(a & b & 1),
            BinOp::Or => Ok((a | b) & 1),
            BinOp::Xor => Ok((a ^ b) & 1),
            _ => Err(unsupported(bin_name(op), ty)),
        },
        Class::Int { bits, signed } => {
            let (x, y) = (ext(a, bits, signed), ext(b, bits, signed));
            let r = match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x.wrapping_mul(y),
                BinOp::MulHi => {
                    if signed {
                        (x * y) >> bits
                    } else {
                        ((x as u128 * y as u128) >> bits) as i128
                    }
                }
                BinOp::MulWide => {
                    if bits > 32 {
                        return Err(unsupported("mul.wide", ty));
                    }
                    return Ok(wrap(x * y, 2 * bits));
                }
                BinOp::Div | BinOp::Rem => {
                    if y == 0 {
                        return Err(NumError::DivisionByZero);
                    }
                    // Truncating division; the one overflowing case (MIN / −1) wraps to MIN, and its
                    // remainder is 0.
                    if op == BinOp::Div { x / y } else { x % y }
                }
                BinOp::Min => x.min(y),
                BinOp::Max => x.max(y),
                BinOp::And => x & y,
                BinOp::Or => x | y,
                BinOp::Xor => x ^ y,
                BinOp::Shl => {
                    // Shift amounts of the width or more clamp to the width.
                    let s = (b & 0xFFFF_FFFF).min(u64::from(bits));
                    if s >= u64::from(bits) { 0 } else { x << s }
                }
                BinOp::Shr => {
                    let s = (b & 0xFFFF_FFFF).min(u64::from(bits));
                    if s >= u64::from(bits) { if signed && x < 0 { -1 } else { 0 } } else { x >> s }
                }
            };
            Ok(wrap(r, bits))
        }
        Class::F32 => {
            let r = f32_bin(op, f32::from_bits(a as u32), f32::from_bits(b as u32), ty)?;
            Ok(u64::from(r.to_bits()))
        }
        Class::F64 => {
            let (x, y) = (f64::from_bits(a), f64::from_bits(b));
            let r = match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => x / y,
                BinOp::Min => fminmax(x, y, false),
                BinOp::Max => fminmax(x, y, true),
                _ => return Err(unsupported(bin_name(op), ty)),
            };
            Ok(r.to_bits())
        }
        Class::F16 | Class::Bf16 | Class::F16x2 | Class::Bf16x2 => {
            let (fmt, lanes) = half_format(ty);
            if !matches!(op, BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Min | BinOp::Max) {
                return Err(unsupported(bin_name(op), ty));
            }
            // Validate once outside the per-lane closure (which cannot fail for these ops).
            Ok(per_half(&[a, b], lanes, fmt, |v| f32_bin(op, v[0], v[1], ty).unwrap_or(f32::NAN)))
        }
    }
}

fn half_format(ty: Ty) -> (Half, u32) {
    match ty {
        Ty::F16 => (Half::F16, 1),
        Ty::F16x2 => (Half::F16, 2),
        Ty::Bf16 => (Half::Bf16, 1),
        _ => (Half::Bf16, 2),
    }
}

/// `mad.lo.ty` (integers) or `fma.rn.ty` (floats): `a * b + c`.
pub fn mad(ty: Ty, a: u64, b: u64, c: u64) -> Result<u64, NumError> {
    match class(ty) {
        Class::Pred => Err(unsupported("mad", ty)),
        Class::Int { bits, signed } => {
            let r = ext(a, bits, signed).wrapping_mul(ext(b, bits, signed)).wrapping_add(ext(c, bits, signed));
            Ok(wrap(r, bits))
        }
        Class::F32 => {
            let r = f32::from_bits(a as u32).mul_add(f32::from_bits(b as u32), f32::from_bits(c as u32));
            Ok(u64::from(r.to_bits()))
        }
        Class::F64 => Ok(f64::from_bits(a).mul_add(f64::from_bits(b), f64::from_bits(c)).to_bits()),
        Class::F16 | Class::Bf16 | Class::F16x2 | Class::Bf16x2 => {
            let (fmt, lanes) = half_format(ty);
            let mut out = 0u64;
            for lane in 0..lanes {
                let get = |x: u64| f64::from(fmt.to_f32((x >> (16 * lane)) as u16));
                let r = get(a).mul_add(get(b), get(c));
                out |= u64::from(fmt.round_f64(r)) << (16 * lane);
            }
            Ok(out)
        }
    }
}

/// `op.ty a` on register bits.
pub fn un(op: UnOp, ty: Ty, a: u64) -> Result<u64, NumError> {
    let c = class(ty);
    match (op, c) {
        (UnOp::Not, Class::Pred) => Ok(!a & 1),
        (UnOp::Not, Class::Int { bits, .. }) => Ok(wrap(!i128::from(a), bits)),
        (UnOp::Neg, Class::Int { bits, signed }) => Ok(wrap(-ext(a, bits, signed), bits)),
        (UnOp::Abs, Class::Int { bits, .. }) => Ok(wrap(ext(a, bits, true).abs(), bits)),
        // Float neg and abs only touch the sign bit (of each half for packed types).
        (UnOp::Neg, Class::F32) => Ok(a ^ 0x8000_0000),
        (UnOp::Abs, Class::F32) => Ok(a & 0x7FFF_FFFF),
        (UnOp::Neg, Class::F64) => Ok(a ^ (1 << 63)),
        (UnOp::Abs, Class::F64) => Ok(a & !(1 << 63)),
        (UnOp::Neg, Class::F16 | Class::Bf16) => Ok(a ^ 0x8000),
        (UnOp::Abs, Class::F16 | Class::Bf16) => Ok(a & 0x7FFF),
        (UnOp::Neg, Class::F16x2 | Class::Bf16x2) => Ok(a ^ 0x8000_8000),
        (UnOp::Abs, Class::F16x2 | Class::Bf16x2) => Ok(a & 0x7FFF_7FFF),
        (UnOp::Sqrt, Class::F64) => Ok(f64::from_bits(a).sqrt().to_bits()),
        (UnOp::Rcp, Class::F64) => Ok((1.0 / f64::from_bits(a)).to_bits()),
        (_, Class::F32) => {
            let x = f32::from_bits(a as u32);
            let r = match op {
                UnOp::Sqrt => x.sqrt(),
                UnOp::Rcp => 1.0 / x,
                UnOp::RsqrtApprox => ftz(f64_to_f32(1.0 / f64::from(ftz(x)).sqrt())),
                UnOp::RcpApprox => ftz(1.0 / ftz(x)),
                UnOp::Ex2Approx => ftz(f64_to_f32(f64::from(ftz(x)).exp2())),
                UnOp::Lg2Approx => ftz(f64_to_f32(f64::from(ftz(x)).log2())),
                UnOp::TanhApprox => f64_to_f32(f64::from(x).tanh()),
                _ => return Err(unsupported(un_name(op), ty)),
            };
            Ok(u64::from(r.to_bits()))
        }
        _ => Err(unsupported(un_name(op), ty)),
    }
}

/// `setp.cmp.ty a, b`. Float comparisons are ordered: any NaN operand gives false (also for `ne`).
pub fn setp(cmp: Cmp, ty: Ty, a: u64, b: u64) -> Result<bool, NumError> {
    let ord = |o: Option<std::cmp::Ordering>| -> bool {
        use std::cmp::Ordering::*;
        match (o, cmp) {
            (None, _) => false,
            (Some(o), Cmp::Eq) => o == Equal,
            (Some(o), Cmp::Ne) => o != Equal,
            (Some(o), Cmp::Lt) => o == Less,
            (Some(o), Cmp::Le) => o != Greater,
            (Some(o), Cmp::Gt) => o == Greater,
            (Some(o), Cmp::Ge) => o != Less,
        }
    };
    match class(ty) {
        Class::Pred => match cmp {
            Cmp::Eq => Ok(a & 1 == b & 1),
            Cmp::Ne => Ok(a & 1 != b & 1),
            _ => Err(NumError::Unsupported("setp on .pred only compares eq and ne".into())),
        },
        Class::Int { bits, signed } => Ok(ord(Some(ext(a, bits, signed).cmp(&ext(b, bits, signed))))),
        Class::F32 => Ok(ord(f32::from_bits(a as u32).partial_cmp(&f32::from_bits(b as u32)))),
        Class::F64 => Ok(ord(f64::from_bits(a).partial_cmp(&f64::from_bits(b)))),
        Class::F16 | Class::Bf16 => {
            let (fmt, _) = half_format(ty);
            Ok(ord(fmt.to_f32(a as u16).partial_cmp(&fmt.to_f32(b as u16))))
        }
        Class::F16x2 | Class::Bf16x2 => Err(unsupported("setp", ty)),
    }
}

/// A scalar value read for conversion.
enum Scalar {
    Int(i128),
    Float(f64),
}

/// `cvt[.rnd].dst.src`: integer ↔ integer (sign- or zero-extend by the source type, then truncate),
/// integer → float (round to nearest even), float → integer (`.rzi`: toward zero; `.rn` on a float →
/// integer conversion is read as `.rni`, to nearest even; both saturate to the destination's range and
/// map NaN to 0), float → float (exact widening; narrowing rounds to nearest even; between types of
/// the same size `.rzi` rounds to an integral value and `.rn` is the identity).
pub fn cvt(dst: Ty, src: Ty, rnd: Option<Round>, v: u64) -> Result<u64, NumError> {
    let s = match class(src) {
        Class::Int { bits, signed } => Scalar::Int(ext(v, bits, signed)),
        Class::F32 => Scalar::Float(f64::from(f32::from_bits(v as u32))),
        Class::F64 => Scalar::Float(f64::from_bits(v)),
        Class::F16 => Scalar::Float(f64::from(f16_to_f32(v as u16))),
        Class::Bf16 => Scalar::Float(f64::from(bf16_to_f32(v as u16))),
        _ => return Err(NumError::Unsupported(format!("cvt from .{}", src.name()))),
    };
    match (class(dst), s) {
        (Class::Int { bits, .. }, Scalar::Int(x)) => Ok(wrap(x, bits)),
        (Class::Int { bits, signed }, Scalar::Float(x)) => {
            if x.is_nan() {
                return Ok(0);
            }
            let r = if rnd == Some(Round::Nearest) { x.round_ties_even() } else { x.trunc() };
            let (lo, hi) =
                if signed { (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1) } else { (0, (1i128 << bits) - 1) };
            // f64 → i128 saturates; then clamp to the destination's range.
            Ok(wrap((r as i128).clamp(lo, hi), bits))
        }
        (dc, s) => {
            let x = match s {
                // Integers of more than 53 bits are first rounded to f64; only affects 64-bit
                // integers converted to f64 itself (exact otherwise up to the target precision)
                // and is documented as a limitation.
                Scalar::Int(i) => i as f64,
                Scalar::Float(f) => {
                    let same_size = dst.bytes() == src.bytes();
                    if same_size && rnd == Some(Round::ZeroInt) { f.trunc() } else { f }
                }
            };
            Ok(match dc {
                Class::F32 => u64::from(f64_to_f32(x).to_bits()),
                Class::F64 => x.to_bits(),
                Class::F16 => u64::from(f64_to_f16(x)),
                Class::Bf16 => u64::from(f64_to_bf16(x)),
                _ => return Err(NumError::Unsupported(format!("cvt to .{}", dst.name()))),
            })
        }
    }
}

/// The f32 bit pattern of `x` read as a value of a float type (`Operand::F32` immediates): exact for
/// f32 and f64, rounded to nearest even for the 16-bit types (both halves for packed types).
pub fn f32_imm(x: f32, ty: Ty) -> u64 {
    match ty {
        Ty::F64 => f64::from(x).to_bits(),
        Ty::F16 => u64::from(f32_to_f16(x)),
        Ty::Bf16 => u64::from(f32_to_bf16(x)),
        Ty::F16x2 => u64::from(f32_to_f16(x)) * 0x1_0001,
        Ty::Bf16x2 => u64::from(f32_to_bf16(x)) * 0x1_0001,
        _ => u64::from(x.to_bits()) & mask(ty),
    }
}

/// The integer value of a register read as an i128 (for comparisons of loop bounds).
pub fn int_value(ty: Ty, v: u64) -> i128 {
    match class(ty) {
        Class::Int { bits, signed } => ext(v, bits, signed),
        _ => i128::from(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_the_generic_rounding() {
        let samples = [
            1.0f32,
            f32::from_bits(0x3F80_8000), // 1 + 2^-8, exactly half an ulp above 1: ties to even (down)
            f32::from_bits(0x3F81_8000), // 1 + 3/256: tie, rounds up to even
            1.0039063,                   // just above the tie: up
            -3.3,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-45,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::from_bits(0x7F7F_8000), // the tie above the largest finite: rounds to infinity
        ];
        for x in samples {
            assert_eq!(f32_to_bf16(x), f64_to_bf16(f64::from(x)), "{x:e}");
        }
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7F7F_8000)), 0x7F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7F7F_7FFF)), 0x7F7F);
        assert_eq!(f32_to_bf16(f32::NAN), NAN16);
    }

    #[test]
    fn f16_conversions() {
        assert_eq!(f32_to_f16(1.0), 0x3C00);
        assert_eq!(f32_to_f16(65504.0), 0x7BFF);
        assert_eq!(f32_to_f16(65520.0), 0x7C00); // the tie above the largest finite rounds to infinity
        assert_eq!(f32_to_f16(5.960_464_5e-8), 0x0001); // smallest subnormal
        assert_eq!(f32_to_f16(2.980_232_2e-8), 0x0000); // half of it: tie to even (zero)
        assert_eq!(f32_to_f16(-2.0), 0xC000);
        for h in [0x0001u16, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xC000, 0x8001] {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h);
        }
    }
}
