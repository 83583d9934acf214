//! The `flashc` command line: one subcommand per user job, each a thin layer over the library crates.
//!
//! Exit codes: 0 success, 1 a user error (diagnostics, unreadable input, failed check), 2 bad usage
//! (reported by clap).

mod commands;
mod output;
mod run;

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
    /// Compile a model to an artifact (`-o model.flashc`), or print one stage of the pipeline.
    #[command(after_help = "Examples:\n  flashc compile examples/tiny-hybrid.arch -o tiny.flashc\n  \
                            flashc compile examples/tiny-hybrid.arch --emit ast\n  \
                            flashc compile examples/tiny-hybrid.arch --emit spec -o tiny.spec.json\n  \
                            flashc compile examples/nemotron-flash-1b.arch --emit gir --mode decode --print-after fuse-matmul")]
    Compile {
        /// The model file.
        file: PathBuf,
        /// The stage to print; without it, `-o FILE` writes the compiled artifact.
        #[arg(long, value_enum)]
        emit: Option<Emit>,
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
        /// With `-o`: assemble every kernel with ptxas and record its registers, spills and shared
        /// memory in the artifact.
        #[arg(long)]
        resources: bool,
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
    /// Summarise a compiled artifact (`.flashc`).
    #[command(after_help = "Example:\n  flashc inspect tiny.flashc")]
    Inspect {
        /// The artifact.
        file: PathBuf,
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
    /// Generate text: prefill the prompt(s), then decode token by token, streaming the output.
    #[command(after_help = "Examples:\n  flashc init examples/tiny-hybrid.arch -o tiny.safetensors\n  \
                            flashc generate examples/tiny-hybrid.arch --weights tiny.safetensors --prompt \"Hello\" --max-tokens 32\n  \
                            flashc generate ~/models/Qwen3-0.6B --prompt \"The capital of France is\" --temperature 0.7 --top-p 0.9\n\n\
                            MODEL is an .arch file, or a Hugging Face directory (config.json, safetensors, tokenizer.json)\n\
                            whose .arch is imported on the fly.")]
    Generate {
        /// The model: an .arch file or a Hugging Face directory.
        model: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
        /// A prompt; give several for a batch.
        #[arg(long, required = true)]
        prompt: Vec<String>,
        /// Tokens to generate per prompt.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Keep only the k most likely tokens.
        #[arg(long)]
        top_k: Option<usize>,
        /// Keep the smallest set of tokens whose probability reaches p.
        #[arg(long)]
        top_p: Option<f32>,
        /// Penalty for tokens already in the sequence (1 = off).
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop when one of these tokens (text of a single token, or `#ID`) is generated.
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Latency, throughput, per-kernel times and the decode memory roofline.
    #[command(
        after_help = "Examples:\n  flashc bench examples/hybrid-100m.arch --random --batch 1,4 --prompt 128 --decode 32\n  \
                            flashc bench examples/nemotron-flash-1b.arch --random --device cuda --batch 1,8,64 --prompt 2048 --decode 256 --json"
    )]
    Bench {
        /// The model: an .arch file, an artifact or a Hugging Face directory.
        model: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
        /// Use random weights instead of `--weights`.
        #[arg(long)]
        random: bool,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        batch: Vec<usize>,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Decode steps.
        #[arg(long, default_value_t = 32)]
        decode: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Full prefill logits (f32, `[T, vocab]` per sequence: `seq0`, `seq1`, ...) as safetensors.
    #[command(
        after_help = "Example:\n  flashc logits examples/tiny-hybrid.arch --weights tiny.safetensors --tokens \"1 2 3\" --tokens \"4 5\" -o out.safetensors"
    )]
    Logits {
        /// The model: an .arch file or a Hugging Face directory.
        model: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
        /// Token ids of one sequence, separated by spaces or commas; repeat for more sequences.
        #[arg(long, required = true)]
        tokens: Vec<String>,
        /// The safetensors file to write (atomically).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Explain a diagnostic code, or list them all.
    #[command(after_help = "Examples:\n  flashc explain E0306\n  flashc explain")]
    Explain {
        /// A code such as `E0306`; omit to list every code.
        code: Option<String>,
    },
}

/// Where a model's weights, tokenizer and device come from.
#[derive(clap::Args, Debug)]
struct LoadArgs {
    /// Weights: a safetensors file, or a directory with `model.safetensors` or a sharded index
    /// (default: the model directory for Hugging Face models).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// A Hugging Face `tokenizer.json` (default: the model directory's, else bytes).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The device to run on.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Store activations and weights in this dtype instead of the model's `dtype` (e.g. run an f32
    /// reference model on the GPU kernels, which are bf16 first).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
}

/// Storage dtypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    Bf16,
    F16,
    F32,
}

impl DTypeArg {
    fn dtype(self) -> flashc_dsl::spec::DType {
        match self {
            DTypeArg::Bf16 => flashc_dsl::spec::DType::Bf16,
            DTypeArg::F16 => flashc_dsl::spec::DType::F16,
            DTypeArg::F32 => flashc_dsl::spec::DType::F32,
        }
    }
}

/// Devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// Exact f32 reference kernels on the host.
    Cpu,
    /// The GPU kernels interpreted on the host.
    Sim,
    /// An NVIDIA GPU through the CUDA driver.
    Cuda,
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
    /// The host schedule as Cranelift IR (the code that launches the program's kernels).
    Clif,
    /// The kernels of every kernel group as kir (prep, then the step); groups without a generator
    /// yet appear as a comment line.
    Kir,
    /// The kernels of every kernel group as PTX modules (prep, then the step).
    Ptx,
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
        Command::Compile { file, emit, mode, passes, print_after, output, resources } => commands::compile(
            &file,
            &commands::CompileOptions { emit, mode: mode.mode(), passes, print_after, resources },
            output.as_deref(),
        ),
        Command::Fmt { files, write, check } => commands::fmt(&files, write, check),
        Command::ImportHf { dir, output } => commands::import_hf(&dir, output.as_deref()),
        Command::Init { file, output, seed } => commands::init(&file, &output, seed),
        Command::Inspect { file } => commands::inspect(&file),
        Command::Generate {
            model,
            load,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
        } => {
            let sampling =
                flashc_runtime::sample::SamplingParams { temperature, top_k, top_p, repetition_penalty, seed };
            run::generate(&model, &load, &prompt, max_tokens, sampling, &stop)
        }
        Command::Logits { model, load, tokens, output } => run::logits(&model, &load, &tokens, &output),
        Command::Bench { model, load, random, batch, prompt, decode, json } => {
            run::bench(&model, &load, random, &batch, prompt, decode, json)
        }
        Command::Explain { code } => commands::explain(code.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(commands::Failed) => ExitCode::FAILURE,
    }
}
