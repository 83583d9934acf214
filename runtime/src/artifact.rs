//! artifact: the compiled model file (`.flashc`), versioned and self-describing.
//!
//! Layout: the magic bytes `FLASHC\0\n`, then one JSON document (UTF-8, keys in a fixed order):
//! `format` (the artifact format version), `flashc` (the compiler version), `source_hash` (SHA-256 of
//! the `.arch` text it was compiled from), `spec`, the weight `manifest` (names, shapes, roles),
//! `programs` (prefill, decode, train and, with meta tokens, prefix — each the scheduled program with
//! its graph), for each program the `kernels` its groups compile to (per kernel: its group and part,
//! the PTX for sm_80 and for sm_90, the launch rule, the block and static shared memory, and with
//! `BuildOptions::resources` ptxas's registers, spills and shared memory per target), the
//! `scratch` buffers those kernels use and the groups that have no kernel generator yet (`missing`,
//! with the reason), and `content_hash`: SHA-256 of the document with `content_hash` empty. The same input gives a
//! byte-identical file. Reading checks the magic, the version and the hash, so a truncated, corrupt
//! or foreign file is a clear error.
//!
//! `cache_path` gives the content-addressed location of an `.arch` source's artifact, so the runtime
//! can compile on the fly once and reuse it.

use std::path::{Path, PathBuf};

use flashc_codegen::kernels::LaunchRule;
use flashc_codegen::kernels::dispatch;
use flashc_codegen::ptx::{self, Options as PtxOptions, Target};
use flashc_compiler::gir::Mode;
use flashc_compiler::lower::LowerOptions;
use flashc_compiler::schedule::Program;
use flashc_dsl::ModelSpec;
use flashc_dsl::manifest::{TensorDecl, manifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::compile;
use crate::weights::{WeightError, write_atomic};

/// The first bytes of every artifact.
pub const MAGIC: &[u8; 8] = b"FLASHC\0\n";
/// The artifact format this build writes and reads.
pub const FORMAT: u32 = 2;

/// The PTX targets an artifact carries.
pub const TARGETS: [Target; 2] = [Target::Sm80, Target::Sm90];

/// A kernel generated for one kernel group of a program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelArtifact {
    /// The kernel group (`k7`) it implements.
    pub group: u32,
    /// Its place among the group's kernels (launched in order).
    pub part: u32,
    pub name: String,
    /// PTX text per target (`sm_80`, `sm_90`).
    pub ptx: Vec<(String, String)>,
    /// The launch rule (grid, block, dynamic shared memory, arguments).
    pub launch: LaunchRule,
    /// Threads per block the kernel is written for.
    pub block: Option<[u32; 3]>,
    /// Static shared memory in bytes.
    pub static_shared: u32,
    /// What `ptxas -v` reports per target, when the artifact was built with `--resources`.
    pub resources: Vec<Resources>,
}

/// ptxas's resource report of one kernel for one target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub target: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
}

/// How to build an artifact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Assemble every kernel with ptxas and record its registers, spills and shared memory (slow:
    /// one ptxas run per distinct kernel and target; an error when ptxas is missing).
    pub resources: bool,
}

/// A scratch buffer of one group's kernels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScratchArtifact {
    pub group: u32,
    /// The placeholder buffer id the launch rules use.
    pub buffer: u32,
    pub what: String,
    /// Size in bytes, in B, T, S.
    pub bytes: String,
}

/// One compiled entry point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramArtifact {
    pub mode: String,
    pub program: Program,
    pub kernels: Vec<KernelArtifact>,
    pub scratch: Vec<ScratchArtifact>,
    /// Groups without a kernel generator yet: (group, why). They run on `cpu` only.
    pub missing: Vec<(u32, String)>,
}

/// ptxas reports by (target, kernel body without its name), so identical kernels assemble once.
type ResourceCache = std::collections::BTreeMap<(String, String), Resources>;

/// The kernels of a program's groups, their scratch, and the groups without a generator.
fn kernels_of(program: &Program, resources: Option<&mut ResourceCache>) -> Result<ProgramArtifact, ArtifactError> {
    let mut resources = resources;
    let mut out = ProgramArtifact {
        mode: program.mode.name().to_string(),
        program: program.clone(),
        kernels: Vec::new(),
        scratch: Vec::new(),
        missing: Vec::new(),
    };
    for (group, result) in dispatch::generate_all(program) {
        let d = match result {
            Ok(d) => d,
            Err(e) => {
                out.missing.push((group.id.0, e.to_string()));
                continue;
            }
        };
        for (part, g) in d.kernels.iter().enumerate() {
            let mut ptx = Vec::new();
            let mut reports = Vec::new();
            for target in TARGETS {
                let text = ptx::write_string(&g.kernel, &PtxOptions { target })
                    .map_err(|e| ArtifactError::Compile(format!("{}: {e}", g.kernel.name)))?;
                if let Some(cache) = resources.as_deref_mut() {
                    let arch = target.to_string();
                    let body: String = text.lines().filter(|l| !l.contains(&g.kernel.name)).collect();
                    let key = (arch.clone(), body);
                    let r = match cache.get(&key) {
                        Some(r) => r.clone(),
                        None => {
                            let r = ptx::ptxas::assemble(&text, &arch).map_err(|e| {
                                ArtifactError::Compile(format!("ptxas rejected {} for {arch}: {e}", g.kernel.name))
                            })?;
                            let r = Resources {
                                target: arch,
                                registers: r.registers,
                                spill_stores: r.spill_stores,
                                spill_loads: r.spill_loads,
                                shared_bytes: r.shared_bytes,
                                stack_bytes: r.stack_bytes,
                            };
                            cache.insert(key, r.clone());
                            r
                        }
                    };
                    reports.push(r);
                }
                ptx.push((target.to_string(), text));
            }
            out.kernels.push(KernelArtifact {
                group: group.id.0,
                part: part as u32,
                name: g.kernel.name.clone(),
                ptx,
                launch: g.launch.clone(),
                block: g.kernel.block,
                static_shared: g.kernel.static_shared_bytes(),
                resources: reports,
            });
        }
        for sc in &d.scratch {
            out.scratch.push(ScratchArtifact {
                group: group.id.0,
                buffer: sc.id.0,
                what: sc.what.clone(),
                bytes: sc.bytes.to_string(),
            });
        }
    }
    Ok(out)
}

/// A compiled model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub format: u32,
    pub flashc: String,
    pub source_hash: String,
    pub spec: ModelSpec,
    pub manifest: Vec<TensorDecl>,
    pub programs: Vec<ProgramArtifact>,
    pub content_hash: String,
}

/// Why an artifact could not be read or written.
#[derive(Debug, Clone, PartialEq)]
pub enum ArtifactError {
    Io(String),
    NotAnArtifact(PathBuf),
    Version { path: PathBuf, found: u32 },
    Corrupt { path: PathBuf, message: String },
    Compile(String),
}

impl std::fmt::Display for ArtifactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArtifactError::Io(m) => write!(f, "{m}"),
            ArtifactError::NotAnArtifact(p) => {
                write!(f, "`{}` is not a flashc artifact (bad magic bytes)", p.display())
            }
            ArtifactError::Version { path, found } => write!(
                f,
                "`{}` is an artifact of format {found}, but this flashc reads format {FORMAT}; recompile it",
                path.display()
            ),
            ArtifactError::Corrupt { path, message } => write!(f, "`{}` is corrupt: {message}", path.display()),
            ArtifactError::Compile(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ArtifactError {}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compiles a spec (from `source`, for the source hash) into an artifact.
pub fn build(source: &str, spec: &ModelSpec) -> Result<Artifact, ArtifactError> {
    build_with(source, spec, BuildOptions::default())
}

/// Compiles a spec into an artifact with options.
pub fn build_with(source: &str, spec: &ModelSpec, options: BuildOptions) -> Result<Artifact, ArtifactError> {
    if options.resources && ptx::ptxas::find().is_none() {
        return Err(ArtifactError::Compile(
            "--resources needs ptxas (set FLASHC_PTXAS or run scripts/install-ptxas.sh)".to_string(),
        ));
    }
    let mut cache = options.resources.then(ResourceCache::new);
    let mut programs = Vec::new();
    for mode in Mode::ALL {
        // Prefill expects the meta-token prefix in the caches; the prefix entry point prepends it.
        let opts = LowerOptions { mode, prepend_meta: false };
        let program = compile(spec, &opts).map_err(|e| ArtifactError::Compile(e.to_string()))?;
        programs.push(kernels_of(&program, cache.as_mut())?);
    }
    if spec.meta_tokens > 0 {
        let program = compile(spec, &LowerOptions { mode: Mode::Prefill, prepend_meta: true })
            .map_err(|e| ArtifactError::Compile(e.to_string()))?;
        let mut p = kernels_of(&program, cache.as_mut())?;
        p.mode = "prefix".to_string();
        programs.push(p);
    }
    let mut a = Artifact {
        format: FORMAT,
        flashc: env!("CARGO_PKG_VERSION").to_string(),
        source_hash: sha256_hex(source.as_bytes()),
        spec: spec.clone(),
        manifest: manifest(spec),
        programs,
        content_hash: String::new(),
    };
    a.content_hash = a.compute_hash()?;
    Ok(a)
}

impl Artifact {
    fn compute_hash(&self) -> Result<String, ArtifactError> {
        let body = serde_json::to_vec(&Artifact { content_hash: String::new(), ..self.clone() })
            .map_err(|e| ArtifactError::Compile(format!("cannot serialise the artifact: {e}")))?;
        Ok(sha256_hex(&body))
    }

    /// The bytes of the artifact file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ArtifactError> {
        let mut out = MAGIC.to_vec();
        let body = serde_json::to_vec(self).map_err(|e| ArtifactError::Compile(format!("cannot serialise: {e}")))?;
        out.extend(body);
        Ok(out)
    }

    /// Reads and checks an artifact from bytes (`path` only names it in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Artifact, ArtifactError> {
        let Some(body) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return Err(ArtifactError::NotAnArtifact(path.to_path_buf()));
        };
        // Read the format first, so a future format is reported as such, not as corruption.
        let probe: serde_json::Value = serde_json::from_slice(body).map_err(|e| ArtifactError::Corrupt {
            path: path.to_path_buf(),
            message: format!("the JSON body does not parse ({e}); the file may be truncated"),
        })?;
        let format = probe.get("format").and_then(serde_json::Value::as_u64).unwrap_or(0) as u32;
        if format != FORMAT {
            return Err(ArtifactError::Version { path: path.to_path_buf(), found: format });
        }
        let a: Artifact = serde_json::from_value(probe)
            .map_err(|e| ArtifactError::Corrupt { path: path.to_path_buf(), message: e.to_string() })?;
        let want = a.compute_hash()?;
        if want != a.content_hash {
            return Err(ArtifactError::Corrupt {
                path: path.to_path_buf(),
                message: format!("content hash mismatch (stored {}, computed {want})", a.content_hash),
            });
        }
        Ok(a)
    }

    /// Writes the artifact atomically.
    pub fn save(&self, path: &Path) -> Result<(), ArtifactError> {
        write_atomic(path, &self.to_bytes()?).map_err(|e: WeightError| ArtifactError::Io(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Artifact, ArtifactError> {
        let bytes =
            std::fs::read(path).map_err(|e| ArtifactError::Io(format!("cannot read `{}`: {e}", path.display())))?;
        Artifact::from_bytes(&bytes, path)
    }

    /// The program of a mode (`prefill`, `decode`, `train`, `prefix`).
    pub fn program(&self, mode: &str) -> Option<&Program> {
        self.programs.iter().find(|p| p.mode == mode).map(|p| &p.program)
    }

    /// A short human summary (`flashc inspect`).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "flashc artifact format {} (flashc {})\nmodel {}: {} layers, vocab {}, hidden {}\nsource sha256 {}\ncontent sha256 {}\n",
            self.format,
            self.flashc,
            self.spec.name,
            self.spec.layers.len(),
            self.spec.vocab,
            self.spec.hidden,
            self.source_hash,
            self.content_hash
        );
        let params: u64 = self.manifest.iter().map(TensorDecl::numel).sum();
        s.push_str(&format!("weights: {} tensors, {params} parameters\n", self.manifest.len()));
        for p in &self.programs {
            let ptx: usize = p.kernels.iter().map(|k| k.ptx.len()).sum();
            let groups = p.program.prep.len() + p.program.kernels.len();
            let spills: u32 = p.kernels.iter().flat_map(|k| &k.resources).map(|r| r.spill_stores).sum();
            let regs = p.kernels.iter().flat_map(|k| &k.resources).map(|r| r.registers).max();
            let resources = match regs {
                Some(r) => format!("; ptxas: at most {r} registers, {spills} bytes spilled"),
                None => String::new(),
            };
            s.push_str(&format!(
                "program {:<8} {:>4} kernels per step, {:>3} at load, {:>4} buffers, arena {}; {} of {groups} groups generated ({} GPU kernels, {} PTX modules{resources})\n",
                p.mode,
                p.program.kernel_count(),
                p.program.prep.len(),
                p.program.buffers.len(),
                p.program.arena.size,
                groups - p.missing.len(),
                p.kernels.len(),
                ptx
            ));
        }
        s
    }
}

/// Where the artifact of an `.arch` source is cached: `$FLASHC_CACHE` or `$XDG_CACHE_HOME/flashc` or
/// `~/.cache/flashc`, named by the SHA-256 of the source and of the compiler that compiles it (the
/// flashc version and the running executable's size and modification time, so a rebuilt compiler
/// never reuses artifacts of an older one).
pub fn cache_path(source: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("FLASHC_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("flashc")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("flashc")))?;
    let key = sha256_hex(format!("{}\n{}\n{}", env!("CARGO_PKG_VERSION"), compiler_fingerprint(), source).as_bytes());
    Some(dir.join(format!("{key}.flashc")))
}

/// Identifies the running compiler build.
fn compiler_fingerprint() -> String {
    let exe = std::env::current_exe().ok();
    let meta = exe.as_ref().and_then(|e| std::fs::metadata(e).ok());
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{:?} {} {mtime}", exe, meta.map_or(0, |m| m.len()))
}

/// The artifact of `source`: from the cache when present and valid, else compiled and cached.
pub fn cached(source: &str, spec: &ModelSpec) -> Result<Artifact, ArtifactError> {
    if let Some(path) = cache_path(source) {
        if let Ok(a) = Artifact::load(&path)
            && a.source_hash == sha256_hex(source.as_bytes())
        {
            return Ok(a);
        }
        let a = build(source, spec)?;
        if let Some(dir) = path.parent()
            && std::fs::create_dir_all(dir).is_ok()
        {
            // A cache that cannot be written is not an error: the artifact is still returned.
            let _ = a.save(&path);
        }
        return Ok(a);
    }
    build(source, spec)
}
