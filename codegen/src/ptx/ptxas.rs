//! ptxas: the offline validator. Finds NVIDIA's PTX assembler (no GPU or driver needed), assembles a
//! module with `ptxas -arch=<arch> -v` and reads its resource report, so tests check that every
//! emitted kernel assembles, and how many registers and how much shared memory it takes.
//!
//! Where ptxas comes from, in order: `$FLASHC_PTXAS`; `ptxas` on `PATH`; the PyPI wheel
//! `nvidia-cuda-nvcc-cu12` (`scripts/install-ptxas.sh`) under any site-packages directory of
//! `python3`. Tests that find none skip the assembler check and say so, unless
//! `FLASHC_REQUIRE_PTXAS=1` (set by CI), where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// What `ptxas -v` reports for a kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of register spill stores and loads (0 for a kernel that fits in registers).
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory, bytes.
    pub shared_bytes: u32,
    /// Stack frame, bytes.
    pub stack_bytes: u32,
    /// Constant memory over all banks, bytes (kernel parameters live in `cmem[0]`).
    pub constant_bytes: u32,
    /// ptxas's warnings, one per line.
    pub warnings: Vec<String>,
}

/// The ptxas binary, if there is one (looked up once per process).
pub fn find() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND.get_or_init(search).clone()
}

/// Whether tests must fail when ptxas is missing (`FLASHC_REQUIRE_PTXAS=1`).
pub fn require() -> bool {
    std::env::var("FLASHC_REQUIRE_PTXAS").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn search() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLASHC_PTXAS").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    wheel()
}

/// ptxas inside the `nvidia-cuda-nvcc-cu12` wheel: asks `python3` once for its site-packages
/// directories (system and user).
fn wheel() -> Option<PathBuf> {
    let script = "import site, sys\n\
                  dirs = list(getattr(site, 'getsitepackages', lambda: [])()) + [site.getusersitepackages()] + sys.path\n\
                  print('\\n'.join(d for d in dirs if d))";
    let out = Command::new("python3").args(["-c", script]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|dir| Path::new(dir.trim()).join("nvidia/cuda_nvcc/bin/ptxas"))
        .find(|p| p.is_file())
}

/// Assembles `ptx` for `arch` (`sm_80`, `sm_90`, `sm_90a`) and returns the resource report, or
/// ptxas's error messages.
pub fn assemble(ptx: &str, arch: &str) -> Result<Report, String> {
    let ptxas = find().ok_or("ptxas not found (set FLASHC_PTXAS or run scripts/install-ptxas.sh)")?;
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let stem = format!("flashc-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let dir = std::env::temp_dir();
    let input = dir.join(format!("{stem}.ptx"));
    let output = dir.join(format!("{stem}.cubin"));
    std::fs::write(&input, ptx).map_err(|e| format!("cannot write {}: {e}", input.display()))?;
    let run = Command::new(&ptxas).arg(format!("-arch={arch}")).arg("-v").arg(&input).arg("-o").arg(&output).output();
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    let run = run.map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    if !run.status.success() {
        return Err(format!("ptxas -arch={arch} failed ({}):\n{}", run.status, text.trim_end()));
    }
    Ok(parse(&text))
}

/// Reads the `-v` report:
///
/// ```text
/// ptxas info    : Function properties for k
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 8 registers, used 0 barriers, 4096 bytes smem, 360 bytes cmem[0]
/// ```
pub fn parse(text: &str) -> Report {
    let mut r = Report::default();
    for line in text.lines() {
        if line.contains("warning") {
            r.warnings.push(line.trim().to_string());
        }
        // Each comma-separated part is `<n> <what>` (or `Used <n> registers`).
        for part in line.split([',', ':']) {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (n, what) = match words.as_slice() {
                ["Used", n, rest @ ..] => (n.parse::<u32>(), rest.join(" ")),
                [n, rest @ ..] => (n.parse::<u32>(), rest.join(" ")),
                [] => continue,
            };
            let Ok(n) = n else { continue };
            match what.as_str() {
                "registers" => r.registers = n,
                "bytes spill stores" => r.spill_stores = n,
                "bytes spill loads" => r.spill_loads = n,
                "bytes smem" => r.shared_bytes = n,
                "bytes stack frame" => r.stack_bytes = n,
                w if w.starts_with("bytes cmem[") => r.constant_bytes += n,
                _ => {}
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_verbose_report() {
        let text = "ptxas info    : 0 bytes gmem\n\
                    ptxas info    : Compiling entry function 'k' for 'sm_80'\n\
                    ptxas info    : Function properties for k\n    \
                    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
                    ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0], 8 bytes cmem[2]\n\
                    ptxas warning : something odd\n";
        let r = parse(text);
        assert_eq!(r.registers, 40);
        assert_eq!(r.spill_stores, 8);
        assert_eq!(r.spill_loads, 4);
        assert_eq!(r.stack_bytes, 16);
        assert_eq!(r.shared_bytes, 4096);
        assert_eq!(r.constant_bytes, 368);
        assert_eq!(r.warnings, vec!["ptxas warning : something odd".to_string()]);
    }
}
