//! types: element types and tensor types of gir values.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::dim::Dim;

/// Element types of gir values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    Bf16,
    F16,
    F32,
    I32,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::I32 => "i32",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "bf16" => DType::Bf16,
            "f16" => DType::F16,
            "f32" => DType::F32,
            "i32" => DType::I32,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        self != DType::I32
    }
}

impl From<flashc_dsl::spec::DType> for DType {
    fn from(d: flashc_dsl::spec::DType) -> DType {
        match d {
            flashc_dsl::spec::DType::Bf16 => DType::Bf16,
            flashc_dsl::spec::DType::F16 => DType::F16,
            flashc_dsl::spec::DType::F32 => DType::F32,
        }
    }
}

/// The type of a gir value: element type and (symbolic) shape. A rank-0 shape is a scalar.
/// Serialises as its printed form (`bf16[B, T, 2048]`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl IntoIterator<Item = Dim>) -> TensorType {
        TensorType { dtype, shape: shape.into_iter().collect() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> Dim {
        Dim::product(&self.shape)
    }

    /// Size in bytes.
    pub fn bytes(&self) -> Dim {
        self.numel().scale(self.dtype.size() as i64)
    }

    /// The last dimension (1 for scalars).
    pub fn last(&self) -> Dim {
        self.shape.last().cloned().unwrap_or_else(|| Dim::constant(1))
    }

    pub fn with_dtype(&self, dtype: DType) -> TensorType {
        TensorType { dtype, shape: self.shape.clone() }
    }

    pub fn with_shape(&self, shape: Vec<Dim>) -> TensorType {
        TensorType { dtype: self.dtype, shape }
    }

    /// Parses `bf16[B, T, 2048]`.
    pub fn parse(text: &str) -> Result<TensorType, String> {
        let text = text.trim();
        let open = text.find('[').ok_or_else(|| format!("expected `dtype[dims]`, found `{text}`"))?;
        let dtype = DType::parse(&text[..open]).ok_or_else(|| format!("unknown dtype `{}`", &text[..open]))?;
        let inner = text[open + 1..].strip_suffix(']').ok_or_else(|| format!("missing `]` in `{text}`"))?;
        let shape = if inner.trim().is_empty() {
            Vec::new()
        } else {
            inner.split(',').map(Dim::parse).collect::<Result<Vec<_>, _>>()?
        };
        Ok(TensorType { dtype, shape })
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype.name())?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl Serialize for TensorType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TensorType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TensorType, D::Error> {
        TensorType::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}
