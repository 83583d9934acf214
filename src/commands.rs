//! The subcommands. Each reports user errors on standard error (diagnostics rendered like rustc) and
//! returns `Err(Failed)` so `main` exits with 1; results go to standard output or an output file.

use std::fs;
use std::path::Path;

use flashc_dsl::diag::{self, Code, Diagnostic};
use flashc_dsl::{ModelSpec, parser, resolve, stats};

use flashc_compiler::gir::{Bindings, Graph, Mode};
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::passes::{Pass, VERIFY_BY_DEFAULT, pipeline, run_passes};
use flashc_compiler::schedule::{Program, schedule};

use crate::Emit;
use crate::output;

/// A command failed; what went wrong has been printed already.
#[derive(Debug)]
pub struct Failed;

type CmdResult = Result<(), Failed>;

/// Prints a one-line error (for failures that have no source span).
pub fn fail(message: impl std::fmt::Display) -> Failed {
    eprintln!("error: {message}");
    Failed
}

/// Reads a model file as raw bytes (UTF-8 is checked by the parser, with a diagnostic).
fn read(path: &Path) -> Result<Vec<u8>, Failed> {
    fs::read(path).map_err(|e| fail(format!("cannot read `{}`: {e}", path.display())))
}

/// A model file and its front-end result.
struct Loaded {
    name: String,
    source: String,
    result: Result<(ModelSpec, Vec<Diagnostic>), Vec<Diagnostic>>,
}

fn load(path: &Path) -> Result<Loaded, Failed> {
    let bytes = read(path)?;
    let name = path.display().to_string();
    let result = parser::parse_bytes(&bytes).and_then(|file| resolve::resolve(&file));
    let source = String::from_utf8_lossy(&bytes).into_owned();
    Ok(Loaded { name, source, result })
}

/// Loads a model, printing its warnings; on errors prints them and fails.
pub fn load_spec(path: &Path) -> Result<(ModelSpec, String), Failed> {
    let loaded = load(path)?;
    match loaded.result {
        Ok((spec, warnings)) => {
            eprint!("{}", diag::render(&loaded.name, &loaded.source, &warnings));
            Ok((spec, loaded.source))
        }
        Err(diags) => {
            report(&loaded.name, &loaded.source, &diags);
            Err(Failed)
        }
    }
}

fn report(name: &str, source: &str, diags: &[Diagnostic]) {
    eprint!("{}", diag::render(name, source, diags));
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    let plural = |n: usize, w: &str| if n == 1 { format!("1 {w}") } else { format!("{n} {w}s") };
    if warnings > 0 {
        eprintln!("error: `{name}` has {} and {}", plural(errors, "error"), plural(warnings, "warning"));
    } else {
        eprintln!("error: `{name}` has {}", plural(errors, "error"));
    }
}

pub fn check(files: &[std::path::PathBuf], deny_warnings: bool) -> CmdResult {
    let mut ok = true;
    for path in files {
        let Ok(loaded) = load(path) else {
            ok = false;
            continue;
        };
        match loaded.result {
            Ok((spec, warnings)) if !deny_warnings || warnings.is_empty() => {
                eprint!("{}", diag::render(&loaded.name, &loaded.source, &warnings));
                let s = stats::model_stats(&spec);
                println!(
                    "ok: {} (model {}, {} layers, {} parameters)",
                    loaded.name,
                    spec.name,
                    spec.layers.len(),
                    stats::thousands(s.params_total)
                );
            }
            Ok((_, warnings)) => {
                report(&loaded.name, &loaded.source, &warnings);
                ok = false;
            }
            Err(diags) => {
                report(&loaded.name, &loaded.source, &diags);
                ok = false;
            }
        }
    }
    if ok { Ok(()) } else { Err(Failed) }
}

/// The compiled side of `flashc info`: kernels per step and activation memory per mode.
#[derive(serde::Serialize)]
struct CompiledInfo {
    /// Batch and prompt length the arena figures are evaluated at.
    batch: i64,
    tokens: i64,
    modes: Vec<ModeInfo>,
}

#[derive(serde::Serialize)]
struct ModeInfo {
    mode: &'static str,
    /// Kernel launches per step before fusion (after cleanup) and after the full pipeline.
    kernels_unfused: usize,
    kernels: usize,
    /// Weight-preparation kernels run once at load.
    prep_kernels: usize,
    /// The activation arena as a function of B, T, S, and its value at `batch`/`tokens`.
    arena: String,
    arena_bytes: i64,
}

fn compiled_info(spec: &ModelSpec, batch: i64, tokens: i64) -> Result<CompiledInfo, Failed> {
    let mut modes = Vec::new();
    for mode in Mode::ALL {
        let kernels = |passes: &[Pass]| -> Result<Program, Failed> {
            let mut g = lower(spec, &LowerOptions::new(mode)).map_err(fail)?;
            run_passes(&mut g, passes, VERIFY_BY_DEFAULT, &mut |_, _| {}).map_err(fail)?;
            schedule(&g).map_err(fail)
        };
        let unfused = kernels(&[Pass::Canonicalize, Pass::Cse, Pass::Dce])?;
        let p = kernels(&pipeline(mode))?;
        let (t, s) = if mode == Mode::Decode { (1, tokens) } else { (tokens, 0) };
        let at = Bindings { b: batch, t, s };
        modes.push(ModeInfo {
            mode: mode.name(),
            kernels_unfused: unfused.kernel_count(),
            kernels: p.kernel_count(),
            prep_kernels: p.prep.len(),
            arena: p.arena.size.to_string(),
            arena_bytes: p.arena_bytes(&at),
        });
    }
    Ok(CompiledInfo { batch, tokens, modes })
}

pub fn info(file: &Path, json: bool, batch: i64, tokens: i64) -> CmdResult {
    if batch < 1 || tokens < 1 {
        return Err(fail("--batch and --tokens must be at least 1"));
    }
    let (spec, _) = load_spec(file)?;
    let s = stats::model_stats(&spec);
    let compiled = compiled_info(&spec, batch, tokens)?;
    let text = if json {
        let v = serde_json::json!({ "model": s, "compiled": compiled });
        to_json(&v)?
    } else {
        let mut t = stats::render_info(&spec, &s);
        t.push_str(&format!(
            "kernels and activation memory (arena at B={batch}, T={tokens}; decode with S={tokens} cached)\n"
        ));
        for m in &compiled.modes {
            t.push_str(&format!(
                "  {:<8} {:>4} kernels per step ({} before fusion, {} at load)   arena {} = {}\n",
                m.mode,
                m.kernels,
                m.kernels_unfused,
                m.prep_kernels,
                m.arena,
                human_bytes(m.arena_bytes)
            ));
        }
        t
    };
    output::emit(&text, None).map_err(|e| fail(format!("cannot write output: {e}")))
}

fn human_bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// What `flashc compile` should produce.
pub struct CompileOptions {
    pub emit: Option<Emit>,
    pub mode: Mode,
    pub passes: Option<Vec<String>>,
    pub print_after: Vec<String>,
    /// Record ptxas's resource report of every kernel in the artifact.
    pub resources: bool,
}

/// Lowers and runs the passes (verifying after each in debug builds), printing `--print-after` dumps.
fn build_gir(spec: &ModelSpec, opts: &CompileOptions) -> Result<Graph, Failed> {
    let passes = match &opts.passes {
        None => pipeline(opts.mode),
        Some(names) if names.iter().all(|n| n == "none") => Vec::new(),
        Some(names) => names
            .iter()
            .map(|n| Pass::parse(n).ok_or_else(|| fail(format!("unknown pass `{n}` (passes: {})", pass_names()))))
            .collect::<Result<Vec<_>, _>>()?,
    };
    for n in &opts.print_after {
        if n != "all" && Pass::parse(n).is_none() {
            return Err(fail(format!("unknown pass `{n}` in --print-after (passes: {})", pass_names())));
        }
    }
    let mut g = lower(spec, &LowerOptions::new(opts.mode)).map_err(fail)?;
    let mut observe = |p: Pass, g: &Graph| {
        if opts.print_after.iter().any(|n| n == "all" || n == p.name()) {
            eprintln!("// gir after {p}\n{g}");
        }
    };
    run_passes(&mut g, &passes, VERIFY_BY_DEFAULT, &mut observe).map_err(fail)?;
    Ok(g)
}

fn pass_names() -> String {
    Pass::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}

pub fn compile(file: &Path, opts: &CompileOptions, out: Option<&Path>) -> CmdResult {
    let Some(emit) = opts.emit else {
        let Some(out) = out else {
            return Err(fail(
                "give `-o FILE.flashc` to write the compiled artifact, or `--emit STAGE` to print a stage",
            ));
        };
        let (spec, source) = load_spec(file)?;
        let options = flashc_runtime::artifact::BuildOptions { resources: opts.resources };
        let artifact = flashc_runtime::artifact::build_with(&source, &spec, options).map_err(fail)?;
        artifact.save(out).map_err(fail)?;
        println!("wrote {} ({})", out.display(), artifact.content_hash);
        return Ok(());
    };
    let text = match emit {
        Emit::Ast => {
            let bytes = read(file)?;
            let name = file.display().to_string();
            match parser::parse_bytes(&bytes) {
                Ok(ast) => to_json(&ast)?,
                Err(diags) => {
                    report(&name, &String::from_utf8_lossy(&bytes), &diags);
                    return Err(Failed);
                }
            }
        }
        Emit::Spec => {
            let (spec, _) = load_spec(file)?;
            to_json(&spec)?
        }
        Emit::Gir => {
            let (spec, _) = load_spec(file)?;
            build_gir(&spec, opts)?.to_string()
        }
        Emit::Program => {
            let (spec, _) = load_spec(file)?;
            let g = build_gir(&spec, opts)?;
            schedule(&g).map_err(|e| fail(format!("internal error while scheduling: {e}")))?.to_string()
        }
        Emit::Clif => {
            let (spec, _) = load_spec(file)?;
            let g = build_gir(&spec, opts)?;
            let p = schedule(&g).map_err(|e| fail(format!("internal error while scheduling: {e}")))?;
            // The schedule of the GPU devices: each group's generated kernels (a group without a
            // generator keeps its default launch).
            let rules = flashc_codegen::kernels::dispatch::generate_all(&p)
                .into_iter()
                .filter_map(|(k, d)| d.ok().map(|d| (k.id, flashc_codegen::host::GroupRules::from(&d))))
                .collect();
            let options = flashc_codegen::host::Options { rules, ..Default::default() };
            flashc_codegen::host::write_string(&p, &options)
                .map_err(|e| fail(format!("internal error while generating the host schedule: {e}")))?
        }
        Emit::Kir | Emit::Ptx => {
            let (spec, _) = load_spec(file)?;
            let g = build_gir(&spec, opts)?;
            let p = schedule(&g).map_err(|e| fail(format!("internal error while scheduling: {e}")))?;
            kernels_text(&p, emit == Emit::Ptx)?
        }
    };
    let dest = out.map(|p| p.display().to_string());
    output::emit(&text, out)
        .map_err(|e| fail(format!("cannot write `{}`: {e}", dest.unwrap_or_else(|| "standard output".to_string()))))
}

/// The kernels of every group of `p` (prep, then the step) as kir or PTX; a group without a generator
/// is one comment line with the reason. Prints the coverage to standard error.
fn kernels_text(p: &flashc_compiler::schedule::Program, ptx: bool) -> Result<String, Failed> {
    use flashc_codegen::kernels::dispatch;
    use std::fmt::Write as _;
    let mut text = String::new();
    let all = dispatch::generate_all(p);
    let mut generated = 0;
    for (group, result) in &all {
        match result {
            Ok(d) => {
                generated += 1;
                let _ = writeln!(text, "// {} {}: {} kernel(s)", group.id, group.name, d.kernels.len());
                if let Some(m) = d.max_rows {
                    let _ = writeln!(text, "// at most {m} rows (batch × tokens)");
                }
                for s in &d.scratch {
                    let _ = writeln!(text, "// scratch {} {}: {} ({} bytes)", s.id, s.what, s.ty, s.bytes);
                }
                for k in &d.kernels {
                    if ptx {
                        let module =
                            flashc_codegen::ptx::write_string(&k.kernel, &flashc_codegen::ptx::Options::default())
                                .map_err(|e| fail(format!("internal error while writing PTX: {e}")))?;
                        text.push_str(&module);
                    } else {
                        let _ = write!(text, "{}", k.kernel);
                    }
                    if !text.ends_with('\n') {
                        text.push('\n');
                    }
                }
            }
            Err(dispatch::DispatchError::Unsupported { op, reason, .. }) => {
                let _ = writeln!(text, "// {} {}: not generated (`{op}`): {reason}", group.id, group.name);
            }
        }
    }
    eprintln!("{generated} of {} kernel groups generated", all.len());
    Ok(text)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, Failed> {
    let mut t = serde_json::to_string_pretty(value).map_err(|e| fail(format!("cannot serialise: {e}")))?;
    t.push('\n');
    Ok(t)
}

pub fn explain(code: Option<&str>) -> CmdResult {
    match code {
        None => {
            for c in Code::ALL {
                println!("{c}  {}", c.summary());
            }
            Ok(())
        }
        Some(wanted) => match Code::ALL.iter().find(|c| c.as_str().eq_ignore_ascii_case(wanted)) {
            Some(c) => {
                println!("{c}: {}", c.summary());
                Ok(())
            }
            None => Err(fail(format!("no diagnostic code `{wanted}`; `flashc explain` lists them all"))),
        },
    }
}

pub fn import_hf(dir: &Path, out: Option<&Path>) -> CmdResult {
    let text = flashc_dsl::import_hf::import_dir(dir).map_err(fail)?;
    // The importer's output must itself be a valid model: check it before writing anything.
    if let Err(diags) = flashc_dsl::load(&text) {
        eprint!("{}", diag::render("<imported>", &text, &diags));
        return Err(fail(format!(
            "internal error: the model imported from `{}` does not check; please report this",
            dir.display()
        )));
    }
    let dest = out.map(|p| p.display().to_string());
    output::emit(&text, out)
        .map_err(|e| fail(format!("cannot write `{}`: {e}", dest.unwrap_or_else(|| "standard output".to_string()))))
}

pub fn fmt(files: &[std::path::PathBuf], write: bool, check: bool) -> CmdResult {
    let mut ok = true;
    for path in files {
        let bytes = read(path)?;
        let name = path.display().to_string();
        let source = match std::str::from_utf8(&bytes) {
            Ok(s) => s,
            Err(_) => {
                let diags = parser::parse_bytes(&bytes).err().unwrap_or_default();
                report(&name, &String::from_utf8_lossy(&bytes), &diags);
                ok = false;
                continue;
            }
        };
        let formatted = match flashc_dsl::fmt::format_source(source) {
            Ok(f) => f,
            Err(diags) => {
                report(&name, source, &diags);
                ok = false;
                continue;
            }
        };
        if check {
            if formatted != source {
                eprintln!("`{name}` is not formatted (run `flashc fmt --write {name}`)");
                ok = false;
            }
        } else if write {
            if formatted != source {
                output::write_atomic(path, formatted.as_bytes())
                    .map_err(|e| fail(format!("cannot write `{name}`: {e}")))?;
                println!("formatted {name}");
            }
        } else {
            output::emit(&formatted, None).map_err(|e| fail(format!("cannot write output: {e}")))?;
        }
    }
    if ok { Ok(()) } else { Err(Failed) }
}

pub fn init(file: &Path, out: &Path, seed: u64) -> CmdResult {
    let (spec, _) = load_spec(file)?;
    let weights = flashc_runtime::weights::init(&spec, seed);
    flashc_runtime::weights::save(&weights, out).map_err(fail)?;
    println!("wrote {} ({} parameters, seed {seed})", out.display(), stats::thousands(weights.param_count() as u64));
    Ok(())
}

pub fn inspect(file: &Path) -> CmdResult {
    let a = flashc_runtime::artifact::Artifact::load(file).map_err(fail)?;
    print!("{}", a.summary());
    Ok(())
}
