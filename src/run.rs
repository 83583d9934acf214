//! The commands that run models: `generate`, `logits` and `bench`, on the device the user chose.
//! The model (and its prepared weights) is built on the cpu; sessions run on the device, through
//! the program's compiled host schedule.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flashc_dsl::ModelSpec;
use flashc_runtime::artifact::{self, Artifact};
use flashc_runtime::cpu::Cpu;
use flashc_runtime::cuda::Cuda;
use flashc_runtime::device::Device;
use flashc_runtime::model::Model;
use flashc_runtime::sample::{Sampler, SamplingParams};
use flashc_runtime::session::Session;
use flashc_runtime::sim::Sim;
use flashc_runtime::tokenizer::Tokenizer;

use crate::commands::{Failed, fail, load_spec};
use crate::{DeviceArg, LoadArgs};

type CmdResult = Result<(), Failed>;

/// Evaluates `$body` with `$d` bound to the chosen device (a `&impl Device`).
macro_rules! on_device {
    ($arg:expr, |$d:ident| $body:expr) => {
        match $arg {
            DeviceArg::Cpu => {
                let $d = &Cpu;
                $body
            }
            DeviceArg::Sim => {
                let $d = &Sim;
                $body
            }
            DeviceArg::Cuda => {
                // Fails with "no CUDA driver found" on machines without a GPU.
                let cuda = Cuda::new(0).map_err(fail)?;
                let $d = &cuda;
                $body
            }
        }
    };
}

/// HBM3e bandwidth of the H200 (bytes/s), the roofline of the GPU kernels.
const H200_BANDWIDTH: f64 = 4.8e12;

/// A model ready to run, and how to turn text into tokens.
struct Loaded {
    model: Model,
    tokenizer: Tokenizer,
    /// Token ids that end generation by default (the checkpoint's end-of-sequence ids).
    eos: Vec<u32>,
}

/// Reads the spec (from an .arch file, or by importing a Hugging Face directory), the weights and the
/// tokenizer.
fn load(model: &Path, args: &LoadArgs) -> Result<Loaded, Failed> {
    load_with(model, args, None)
}

/// Like `load`, with random weights from `seed` when given.
fn load_with(model: &Path, args: &LoadArgs, random: Option<u64>) -> Result<Loaded, Failed> {
    if args.device == DeviceArg::Cuda {
        // Fails with "no CUDA driver found" on machines without a GPU, before anything is loaded.
        Cuda::new(0).map_err(fail)?;
    }
    let is_dir = model.is_dir();
    let is_artifact = model.extension().is_some_and(|e| e == "flashc");
    // The compiled programs: from an artifact, or compiled once and cached by content.
    let (spec, artifact): (ModelSpec, Artifact) = if is_artifact {
        let a = Artifact::load(model).map_err(fail)?;
        if let Some(d) = args.dtype.filter(|d| d.dtype() != a.spec.dtype) {
            return Err(fail(format!(
                "`{}` is compiled for {:?} storage; --dtype {d:?} applies to .arch sources and Hugging Face directories",
                model.display(),
                a.spec.dtype
            )));
        }
        (a.spec.clone(), a)
    } else {
        let (spec, source) = if is_dir {
            let text = flashc_dsl::import_hf::import_dir(model).map_err(fail)?;
            let spec = flashc_dsl::load(&text)
                .map_err(|_| {
                    fail(format!("internal error: the model imported from `{}` does not check", model.display()))
                })?
                .0;
            (spec, text)
        } else {
            load_spec(model)?
        };
        match args.dtype {
            // Another storage dtype: compiled here (the cache is keyed by the source alone).
            Some(d) if d.dtype() != spec.dtype => {
                let mut spec = spec;
                spec.dtype = d.dtype();
                let a = artifact::build(&source, &spec).map_err(fail)?;
                (spec, a)
            }
            _ => {
                let a = artifact::cached(&source, &spec).map_err(fail)?;
                (spec, a)
            }
        }
    };
    let weights: PathBuf = match (&args.weights, is_dir) {
        (Some(w), _) => w.clone(),
        (None, true) => model.to_path_buf(),
        (None, false) if random.is_some() => PathBuf::new(),
        (None, false) => return Err(fail("no weights: give `--weights FILE` (`flashc init` writes random ones)")),
    };
    let tokenizer = match (&args.tokenizer, is_dir) {
        (Some(t), _) => Tokenizer::from_file(t).map_err(fail)?,
        (None, true) if model.join("tokenizer.json").is_file() => {
            Tokenizer::from_file(model.join("tokenizer.json")).map_err(fail)?
        }
        _ => Tokenizer::bytes(),
    };
    if (tokenizer.vocab_size() as u64) > spec.vocab {
        return Err(fail(format!(
            "the tokenizer has {} tokens but the model's vocabulary has {}",
            tokenizer.vocab_size(),
            spec.vocab
        )));
    }
    let eos = if is_dir { eos_ids(model) } else { Vec::new() };
    let w = match random {
        Some(seed) => flashc_runtime::weights::init(&spec, seed),
        None => flashc_runtime::weights::load(&spec, &weights).map_err(fail)?,
    };
    let model = Model::from_artifact(&Cpu, &artifact, w).map_err(fail)?;
    Ok(Loaded { model, tokenizer, eos })
}

/// End-of-sequence ids from a Hugging Face directory's `generation_config.json` or `config.json`.
fn eos_ids(dir: &Path) -> Vec<u32> {
    for file in ["generation_config.json", "config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        match &v["eos_token_id"] {
            serde_json::Value::Number(n) => return n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            serde_json::Value::Array(a) => return a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
            _ => {}
        }
    }
    Vec::new()
}

/// Stop tokens given as `#ID` or as the text of one token.
fn stop_ids(stop: &[String], tokenizer: &Tokenizer) -> Result<Vec<u32>, Failed> {
    stop.iter()
        .map(|s| match s.strip_prefix('#') {
            Some(id) => id.parse::<u32>().map_err(|_| fail(format!("`{s}` is not a token id"))),
            None => tokenizer.token_id(s).ok_or_else(|| fail(format!("`{s}` is not a single token of the tokenizer"))),
        })
        .collect()
}

pub fn generate(
    model_path: &Path,
    args: &LoadArgs,
    prompts: &[String],
    max_tokens: usize,
    sampling: SamplingParams,
    stop: &[String],
) -> CmdResult {
    sampling.validate().map_err(|e| fail(format!("bad sampling parameters: {e}")))?;
    let t_load = Instant::now();
    let loaded = load(model_path, args)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let mut stops = stop_ids(stop, &loaded.tokenizer)?;
    stops.extend(&loaded.eos);
    let encoded: Vec<Vec<u32>> =
        prompts.iter().map(|p| loaded.tokenizer.encode(p).map_err(fail)).collect::<Result<_, _>>()?;
    if encoded.iter().any(Vec::is_empty) {
        return Err(fail("a prompt encodes to no tokens"));
    }
    on_device!(args.device, |device| generate_on(
        device, &loaded, prompts, &encoded, max_tokens, &sampling, &stops, load_s
    ))
}

#[allow(clippy::too_many_arguments)]
fn generate_on<D: Device>(
    device: &D,
    loaded: &Loaded,
    prompts: &[String],
    encoded: &[Vec<u32>],
    max_tokens: usize,
    sampling: &SamplingParams,
    stops: &[u32],
    load_s: f64,
) -> CmdResult {
    let batch = prompts.len();
    let mut session = Session::new(device, &loaded.model, batch).map_err(fail)?;
    let mut samplers: Vec<Sampler> = (0..batch)
        .map(|i| Sampler::new(SamplingParams { seed: sampling.seed.wrapping_add(i as u64), ..sampling.clone() }))
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let vocab = loaded.model.spec.vocab as usize;

    let t_prefill = Instant::now();
    let logits = session.prefill(encoded).map_err(fail)?;
    let prefill_s = t_prefill.elapsed().as_secs_f64();
    let prompt_tokens: usize = encoded.iter().map(Vec::len).sum();

    let streaming = batch == 1;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut decoders: Vec<_> = (0..batch).map(|_| loaded.tokenizer.stream_decoder()).collect();
    let mut texts = vec![String::new(); batch];
    let mut done = vec![false; batch];
    let mut generated = 0usize;
    let mut next: Vec<u32> = logits
        .iter()
        .enumerate()
        .map(|(b, l)| {
            let last = &l[l.len() - vocab..];
            let hist = &session.history()[b];
            samplers[b].sample(last, hist)
        })
        .collect();
    if streaming {
        let _ = write!(out, "{}", prompts[0]);
        let _ = out.flush();
    }
    let t_decode = Instant::now();
    let mut steps = 0usize;
    loop {
        for b in 0..batch {
            if done[b] {
                continue;
            }
            generated += 1;
            if stops.contains(&next[b]) {
                done[b] = true;
                continue;
            }
            let piece = decoders[b].step(next[b]).map_err(fail)?;
            if streaming {
                let _ = write!(out, "{piece}");
                let _ = out.flush();
            }
            texts[b].push_str(&piece);
        }
        if done.iter().all(|d| *d) || steps + 1 >= max_tokens {
            break;
        }
        let logits = session.decode(&next).map_err(fail)?;
        steps += 1;
        for b in 0..batch {
            next[b] = samplers[b].sample(&logits[b], &session.history()[b]);
        }
    }
    let decode_s = t_decode.elapsed().as_secs_f64();
    for (b, d) in decoders.into_iter().enumerate() {
        let rest = d.finish().map_err(fail)?;
        if streaming {
            let _ = write!(out, "{rest}");
        }
        texts[b].push_str(&rest);
    }
    if streaming {
        let _ = writeln!(out);
    } else {
        for (b, t) in texts.iter().enumerate() {
            let _ = writeln!(out, "[{b}] {}{t}", prompts[b]);
        }
    }
    let _ = out.flush();
    eprintln!(
        "loaded in {load_s:.2} s; prefill {prompt_tokens} tokens in {prefill_s:.3} s ({:.1} tokens/s); \
         decode {steps} steps × {batch} in {decode_s:.3} s ({:.1} tokens/s, {:.2} ms/step); {generated} tokens generated",
        prompt_tokens as f64 / prefill_s.max(1e-9),
        (steps * batch) as f64 / decode_s.max(1e-9),
        1e3 * decode_s / steps.max(1) as f64,
    );
    Ok(())
}

pub fn logits(model_path: &Path, args: &LoadArgs, tokens: &[String], output: &Path) -> CmdResult {
    let loaded = load(model_path, args)?;
    let seqs: Vec<Vec<u32>> = tokens
        .iter()
        .map(|s| {
            s.split(|c: char| c.is_whitespace() || c == ',')
                .filter(|x| !x.is_empty())
                .map(|x| x.parse::<u32>().map_err(|_| fail(format!("`{x}` is not a token id"))))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<_, _>>()?;
    if seqs.iter().any(Vec::is_empty) {
        return Err(fail("every --tokens needs at least one token id"));
    }
    on_device!(args.device, |device| logits_on(device, &loaded, &seqs, output))
}

fn logits_on<D: Device>(device: &D, loaded: &Loaded, seqs: &[Vec<u32>], output: &Path) -> CmdResult {
    let mut session = Session::new(device, &loaded.model, seqs.len()).map_err(fail)?;
    let logits = session.prefill(seqs).map_err(fail)?;
    let vocab = loaded.model.spec.vocab as usize;
    let names: Vec<String> = (0..seqs.len()).map(|i| format!("seq{i}")).collect();
    let shapes: Vec<[usize; 2]> = seqs.iter().map(|s| [s.len(), vocab]).collect();
    let tensors: Vec<(&str, &[usize], &[f32])> =
        names.iter().zip(&shapes).zip(&logits).map(|((n, s), l)| (n.as_str(), s.as_slice(), l.as_slice())).collect();
    flashc_runtime::weights::save_tensors(&tensors, output, "flashc-logits").map_err(fail)?;
    println!("wrote {} ({} sequences)", output.display(), seqs.len());
    Ok(())
}

pub fn bench(
    model_path: &Path,
    args: &LoadArgs,
    random: bool,
    batches: &[usize],
    prompt: usize,
    decode: usize,
    json: bool,
) -> CmdResult {
    if batches.is_empty() || batches.contains(&0) || prompt == 0 {
        return Err(fail("--batch sizes and --prompt must be at least 1"));
    }
    let loaded = load_with(model_path, args, random.then_some(0))?;
    let model = &loaded.model;
    if model.spec.meta_tokens as usize + prompt + decode > model.spec.max_seq as usize {
        return Err(fail(format!(
            "--prompt {prompt} + --decode {decode} exceeds the model's max_seq of {} (meta tokens included)",
            model.spec.max_seq
        )));
    }
    on_device!(args.device, |device| bench_on(device, model, batches, prompt, decode, json))
}

fn bench_on<D: Device>(
    device: &D,
    model: &Model,
    batches: &[usize],
    prompt: usize,
    decode: usize,
    json: bool,
) -> CmdResult {
    // The roofline's bandwidth: measured on the host for the cpu; the H200's HBM3e for the GPU
    // kernels (on the sim, which interprets them, the achieved fraction is not a GPU figure).
    let (bandwidth, source) = if device.name() == "cpu" {
        eprintln!("measuring memory bandwidth...");
        let bw = flashc_runtime::bench::measure_host_bandwidth();
        (bw, "measured at start-up: parallel streaming reads of 256 MiB".to_string())
    } else {
        (H200_BANDWIDTH, "nominal: H200 HBM3e, 4.8 TB/s".to_string())
    };
    // The cpu keeps weights and activations in f32; the GPU kernels store them in the model's dtype.
    let bytes = if device.name() == "cpu" { 4.0 } else { model.spec.dtype.size() as f64 };
    let mut results = Vec::new();
    for &b in batches {
        eprintln!("batch {b}: prefill {prompt} tokens, decode {decode} steps on {}...", device.name());
        let cfg = flashc_runtime::bench::BenchConfig {
            batch: b,
            prompt,
            decode,
            bandwidth,
            weight_bytes: bytes,
            act_bytes: bytes,
        };
        results.push(flashc_runtime::bench::run(device, model, &cfg).map_err(fail)?);
    }
    let report = flashc_runtime::bench::BenchReport {
        model: model.spec.name.clone(),
        device: device.name().to_string(),
        parameters: flashc_dsl::stats::model_stats(&model.spec).params_total,
        bandwidth_bytes_per_s: bandwidth,
        bandwidth_source: source,
        results,
    };
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| fail(format!("cannot serialise: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", report.table(8));
    }
    Ok(())
}
