//! weights: a model's parameters on the host, in f32, under flashc's canonical names (the manifest).
//!
//! - `load` reads safetensors files (memory-mapped): one file, a directory with `model.safetensors`,
//!   or a sharded checkpoint with `model.safetensors.index.json`. f32, bf16 and f16 are widened to f32.
//!   Tensor names are mapped from the checkpoint's family (`hf::Family`: flashc's own names,
//!   Nemotron-Flash, Qwen3, and the `backbone.*` layout of Mamba2 and NemotronH) in one place.
//! - Every manifest tensor must be present with its exact shape, and every checkpoint tensor must be
//!   used (known non-weights such as rotary caches excepted); otherwise one error names the tensor and
//!   the expected and found shapes. A corrupt header or a truncated file is an error, never a panic.
//! - `init` draws random weights following the reference initialisers; `save` writes flashc-named
//!   safetensors atomically (temp file + rename).

pub mod hf;
mod init;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use flashc_dsl::ModelSpec;
use flashc_dsl::manifest::{TensorDecl, manifest};
use safetensors::{Dtype, SafeTensors};

pub use hf::Family;
pub use init::init;

/// A tensor on the host, f32, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// All weights of a model, by canonical name, in manifest order.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    tensors: BTreeMap<String, HostTensor>,
    /// The family the weights were read as (`Family::Flashc` for generated weights).
    pub family: Family,
}

impl Weights {
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut HostTensor> {
        self.tensors.get_mut(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub(crate) fn from_map(tensors: BTreeMap<String, HostTensor>, family: Family) -> Weights {
        Weights { tensors, family }
    }

    /// Total number of parameters.
    pub fn param_count(&self) -> usize {
        self.tensors.values().map(HostTensor::numel).sum()
    }
}

/// Why weights could not be read or written.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightError {
    Io { path: PathBuf, message: String },
    Corrupt { path: PathBuf, message: String },
    Missing { name: String, source: String, expected: Vec<u64> },
    Shape { name: String, source: String, expected: Vec<u64>, found: Vec<usize> },
    Dtype { source: String, dtype: String },
    Unexpected { source: String, path: PathBuf },
    UnknownFamily { path: PathBuf, detail: String },
}

impl fmt::Display for WeightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightError::Io { path, message } => write!(f, "cannot read `{}`: {message}", path.display()),
            WeightError::Corrupt { path, message } => {
                write!(f, "`{}` is not a valid safetensors file: {message}", path.display())
            }
            WeightError::Missing { name, source, expected } => {
                write!(f, "missing tensor `{source}` (flashc `{name}`, expected shape {expected:?}) in the checkpoint")
            }
            WeightError::Shape { name, source, expected, found } => {
                write!(f, "tensor `{source}` (flashc `{name}`) has shape {found:?}, but the model expects {expected:?}")
            }
            WeightError::Dtype { source, dtype } => {
                write!(f, "tensor `{source}` has dtype {dtype}; flashc reads f32, bf16 and f16")
            }
            WeightError::Unexpected { source, path } => write!(
                f,
                "unexpected tensor `{source}` in `{}`: the model has no such weight (is the .arch right for this checkpoint?)",
                path.display()
            ),
            WeightError::UnknownFamily { path, detail } => {
                write!(f, "cannot tell how the tensors in `{}` are named: {detail}", path.display())
            }
        }
    }
}

impl std::error::Error for WeightError {}

/// The safetensors files of a checkpoint path: the file itself, `DIR/model.safetensors`, or the shards
/// listed in `DIR/model.safetensors.index.json`.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>, WeightError> {
    let io = |p: &Path, e: std::io::Error| WeightError::Io { path: p.to_path_buf(), message: e.to_string() };
    let meta = fs::metadata(path).map_err(|e| io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let index = path.join("model.safetensors.index.json");
    if index.is_file() {
        let text = fs::read_to_string(&index).map_err(|e| io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| WeightError::Corrupt { path: index.clone(), message: e.to_string() })?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| WeightError::Corrupt {
            path: index.clone(),
            message: "no `weight_map` object".to_string(),
        })?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        for f in &files {
            if f.contains('/') || f.contains("..") {
                return Err(WeightError::Corrupt {
                    path: index.clone(),
                    message: format!("shard name `{f}` is not a file name"),
                });
            }
        }
        return Ok(files.into_iter().map(|f| path.join(f)).collect());
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(WeightError::Io {
        path: path.to_path_buf(),
        message: "no model.safetensors or model.safetensors.index.json in this directory".to_string(),
    })
}

/// One tensor as found in a file: its shape and data widened to f32.
fn widen(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>, WeightError> {
    let bytes = view.data();
    let out = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => return Err(WeightError::Dtype { source: name.to_string(), dtype: format!("{other:?}") }),
    };
    Ok(out)
}

/// Reads the weights of `spec` from a checkpoint.
pub fn load(spec: &ModelSpec, path: &Path) -> Result<Weights, WeightError> {
    let files = checkpoint_files(path)?;
    // Map every file; keep the maps alive while tensors are read.
    let mut maps = Vec::with_capacity(files.len());
    for f in &files {
        let file = fs::File::open(f).map_err(|e| WeightError::Io { path: f.clone(), message: e.to_string() })?;
        // SAFETY: the map is read-only and lives only while this function reads it; a file changed by
        // another process underneath could give wrong values but not unsoundness in safe code paths
        // that only copy bytes out.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| WeightError::Io { path: f.clone(), message: e.to_string() })?;
        maps.push((f.clone(), map));
    }
    let mut parsed = Vec::with_capacity(maps.len());
    for (f, map) in &maps {
        let st = SafeTensors::deserialize(map)
            .map_err(|e| WeightError::Corrupt { path: f.clone(), message: e.to_string() })?;
        parsed.push((f.clone(), st));
    }
    // Where each source tensor lives.
    let mut located: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (_, st)) in parsed.iter().enumerate() {
        for name in st.names() {
            located.insert(name.to_string(), i);
        }
    }
    let available: Vec<&str> = located.keys().map(String::as_str).collect();
    let family = Family::detect(&available).ok_or_else(|| WeightError::UnknownFamily {
        path: path.to_path_buf(),
        detail: format!(
            "expected an embedding named `embed`, `model.embed_tokens.weight` or `backbone.embeddings.weight`; found {}",
            preview(&available)
        ),
    })?;
    let names = hf::source_names(family, spec);
    let mut tensors = BTreeMap::new();
    let mut used: BTreeMap<String, ()> = BTreeMap::new();
    for decl in manifest(spec) {
        let source = names.get(&decl.name).cloned().unwrap_or_else(|| decl.name.clone());
        let Some(&file) = located.get(&source) else {
            return Err(WeightError::Missing { name: decl.name, source, expected: decl.shape });
        };
        let view = parsed[file].1.tensor(&source).map_err(|e| WeightError::Corrupt {
            path: parsed[file].0.clone(),
            message: format!("tensor `{source}`: {e}"),
        })?;
        let found = view.shape().to_vec();
        if !shape_matches(&decl, &found) {
            return Err(WeightError::Shape { name: decl.name, source, expected: decl.shape, found });
        }
        let data = widen(&source, &view)?;
        let shape: Vec<usize> = decl.shape.iter().map(|d| *d as usize).collect();
        used.insert(source, ());
        tensors.insert(decl.name, HostTensor { shape, data });
    }
    for name in located.keys() {
        if !used.contains_key(name) && !hf::ignorable(family, spec, name) {
            let file = &parsed[located[name]].0;
            return Err(WeightError::Unexpected { source: name.clone(), path: file.clone() });
        }
    }
    Ok(Weights { tensors, family })
}

/// A checkpoint shape matches the manifest shape exactly, or as HF's `[C, 1, K]` for a `[C, K]` conv.
fn shape_matches(decl: &TensorDecl, found: &[usize]) -> bool {
    let want: Vec<usize> = decl.shape.iter().map(|d| *d as usize).collect();
    if found == want.as_slice() {
        return true;
    }
    decl.role == flashc_dsl::manifest::WeightRole::Conv
        && found.len() == 3
        && found[1] == 1
        && found[0] == want[0]
        && found[2] == want[1]
}

fn preview(names: &[&str]) -> String {
    let shown: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
    let more = names.len().saturating_sub(5);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else if shown.is_empty() {
        "no tensors".to_string()
    } else {
        shown.join(", ")
    }
}

/// Writes weights under flashc's canonical names as f32 safetensors, atomically.
pub fn save(weights: &Weights, path: &Path) -> Result<(), WeightError> {
    let tensors: Vec<(&str, &[usize], &[f32])> =
        weights.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice())).collect();
    save_tensors(&tensors, path, "flashc")
}

/// Writes named f32 tensors as a safetensors file, atomically, with a `format` metadata entry.
pub fn save_tensors(tensors: &[(&str, &[usize], &[f32])], path: &Path, format: &str) -> Result<(), WeightError> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let mut entries: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for ((n, shape, _), data) in tensors.iter().zip(&bytes) {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.to_vec(), data)
            .map_err(|e| WeightError::Corrupt { path: path.to_path_buf(), message: format!("tensor `{n}`: {e}") })?;
        entries.push((n.to_string(), view));
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), format.to_string());
    let out = safetensors::tensor::serialize(entries, Some(meta))
        .map_err(|e| WeightError::Corrupt { path: path.to_path_buf(), message: e.to_string() })?;
    write_atomic(path, &out)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WeightError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".to_string());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let io = |e: std::io::Error| WeightError::Io { path: path.to_path_buf(), message: e.to_string() };
    let result = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}
