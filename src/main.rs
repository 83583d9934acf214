//! The `flashc` command line: one subcommand per user job, each a thin layer over the library crates.
//!
//! Exit codes: 0 success, 1 a user error (diagnostics, unreadable input, failed check), 2 bad usage
//! (reported by clap).

mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// flashc: compile hybrid small-language-model architectures to fused GPU kernels.
#[derive(Parser, Debug)]
#[command(name = "flashc", version, about, long_about = None)]
#[command(after_help = "Examples:\n  flashc check examples/*.arch\n  flashc info examples/nemotron-flash-1b.arch\n  \
                        flashc compile examples/tiny-hybrid.arch --emit spec")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check `.arch` files: print diagnostics, or one `ok` line per file.
    #[command(after_help = "Example:\n  flashc check examples/*.arch")]
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Per-layer table and totals: parameters, bytes, decode state, FLOPs per token.
    #[command(after_help = "Examples:\n  flashc info examples/qwen3-0.6b.arch\n  \
                            flashc info examples/nemotron-flash-1b.arch --json\n  \
                            flashc info examples/nemotron-flash-1b.arch --batch 8 --tokens 2048")]
    Info {
        /// The model file.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Batch size for the activation-arena figure.
        #[arg(long, default_value_t = 1)]
        batch: i64,
        /// Prompt tokens for the prefill activation-arena figure.
        #[arg(long, default_value_t = 4096)]
        tokens: i64,
    },
    /// Compile a model and print (or write) one stage of the pipeline.
    #[command(after_help = "Examples:\n  flashc compile examples/tiny-hybrid.arch --emit ast\n  \
                            flashc compile examples/tiny-hybrid.arch --emit spec -o tiny.spec.json\n  \
                            flashc compile examples/nemotron-flash-1b.arch --emit gir --mode decode --print-after fuse-matmul")]
    Compile {
        /// The model file.
        file: PathBuf,
        /// The stage to print.
        #[arg(long, value_enum, default_value_t = Emit::Spec)]
        emit: Emit,
        /// The mode to lower for (gir and later stages).
        #[arg(long, value_enum, default_value_t = ModeArg::Prefill)]
        mode: ModeArg,
        /// Run these passes (comma-separated names, or `none`) instead of the standard pipeline.
        #[arg(long, value_delimiter = ',')]
        passes: Option<Vec<String>>,
        /// Print the gir to standard error after each named pass (comma-separated, or `all`).
        #[arg(long, value_delimiter = ',')]
        print_after: Vec<String>,
        /// Write to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print `.arch` files in canonical form (comments kept).
    #[command(after_help = "Examples:\n  flashc fmt model.arch\n  flashc fmt --write examples/*.arch\n  \
                            flashc fmt --check examples/*.arch")]
    Fmt {
        /// Files to format.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Rewrite the files in place (atomically) instead of printing.
        #[arg(short, long, conflicts_with = "check")]
        write: bool,
        /// Exit with 1 if any file is not in canonical form; change nothing.
        #[arg(long)]
        check: bool,
    },
    /// Write the `.arch` equivalent of a Hugging Face model directory's `config.json`.
    #[command(name = "import-hf")]
    #[command(after_help = "Supported model_type values: nemotron_flash, qwen3, mamba2, nemotron_h.\n\n\
                            Example:\n  flashc import-hf ~/models/Qwen3-0.6B -o qwen3-0.6b.arch")]
    ImportHf {
        /// Directory holding `config.json`.
        dir: PathBuf,
        /// Write to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write random weights for a model (reference initialisers, deterministic for a seed).
    #[command(after_help = "Example:\n  flashc init examples/tiny-hybrid.arch -o tiny.safetensors --seed 1")]
    Init {
        /// The model file.
        file: PathBuf,
        /// The safetensors file to write (atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Seed of the random initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Explain a diagnostic code, or list them all.
    #[command(after_help = "Examples:\n  flashc explain E0306\n  flashc explain")]
    Explain {
        /// A code such as `E0306`; omit to list every code.
        code: Option<String>,
    },
}

/// Pipeline stages that `compile --emit` can print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Emit {
    /// The syntax tree, as JSON (with byte spans).
    Ast,
    /// The resolved `ModelSpec`, as JSON.
    Spec,
    /// The graph IR after the pass pipeline, as text.
    Gir,
    /// The scheduled program: kernel groups, buffers and the arena plan.
    Program,
}

/// Compilation modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Prefill,
    Decode,
    Train,
}

impl ModeArg {
    fn mode(self) -> flashc_compiler::gir::Mode {
        use flashc_compiler::gir::Mode;
        match self {
            ModeArg::Prefill => Mode::Prefill,
            ModeArg::Decode => Mode::Decode,
            ModeArg::Train => Mode::Train,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { files, deny_warnings } => commands::check(&files, deny_warnings),
        Command::Info { file, json, batch, tokens } => commands::info(&file, json, batch, tokens),
        Command::Compile { file, emit, mode, passes, print_after, output } => commands::compile(
            &file,
            &commands::CompileOptions { emit, mode: mode.mode(), passes, print_after },
            output.as_deref(),
        ),
        Command::Fmt { files, write, check } => commands::fmt(&files, write, check),
        Command::ImportHf { dir, output } => commands::import_hf(&dir, output.as_deref()),
        Command::Init { file, output, seed } => commands::init(&file, &output, seed),
        Command::Explain { code } => commands::explain(code.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(commands::Failed) => ExitCode::FAILURE,
    }
}
