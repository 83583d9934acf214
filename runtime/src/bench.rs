//! bench: latency and throughput of a model on a device, with a per-kernel breakdown and the decode
//! memory-bandwidth roofline.
//!
//! One measurement per batch size: prefill `batch` random prompts of `prompt` tokens (time to first
//! token includes choosing it), then `decode` steps. The roofline for decode is the bytes a step must
//! move — every weight once, every recurrent and conv state read and written, the KV cache of the
//! current context read and one token written — divided by the device's memory bandwidth (on the `cpu`
//! device, a bandwidth measured at start-up). The achieved fraction is that floor over the measured
//! step time.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::device::{Device, RuntimeError};
use crate::model::Model;
use crate::sample::argmax;
use crate::session::Session;

/// Time spent in one kernel (by name) over a measurement.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelTime {
    pub name: String,
    pub calls: u64,
    pub seconds: f64,
}

/// Results for one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub batch: usize,
    pub prompt: usize,
    pub decode: usize,
    /// Prefill of the whole batch plus choosing the first tokens.
    pub time_to_first_token_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Mean time of one decode step (one token for every sequence).
    pub decode_step_ms: f64,
    pub decode_tokens_per_s: f64,
    /// Bytes one decode step must move at the mean context length of the measurement.
    pub decode_bytes_per_step: f64,
    /// The memory-bandwidth floor of a decode step and the measured step's share of it.
    pub roofline_step_ms: f64,
    pub roofline_fraction: f64,
    /// Decode kernels by total time, largest first.
    pub decode_kernels: Vec<KernelTime>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub parameters: u64,
    /// Memory bandwidth the roofline assumes, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    pub bandwidth_source: String,
    pub results: Vec<BenchResult>,
}

/// Measures host memory bandwidth: streaming reads of a 256 MiB buffer on every core (best of 3).
///
/// The reads are summed as integers in eight independent lanes, which the compiler vectorises: a
/// float sum would be one dependent chain of additions, bound by the adder's latency rather than by
/// memory (it measured about a third of the real bandwidth on a 2-core machine).
pub fn measure_host_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 32 << 20; // 32 Mi u64 = 256 MiB
    let data: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = data
            .par_chunks(1 << 15)
            .map(|c| {
                let mut acc = [0u64; 8];
                for lane in c.chunks_exact(8) {
                    for (a, x) in acc.iter_mut().zip(lane) {
                        *a = a.wrapping_add(*x);
                    }
                }
                acc.iter().fold(0u64, |a, x| a.wrapping_add(*x))
            })
            .reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / secs.max(1e-9));
    }
    best
}

/// Bytes one decode step moves for `batch` sequences at `context` cached tokens, with `weight_bytes`
/// per parameter and `act_bytes` per element of KV and conv state (recurrent states are f32).
pub fn decode_bytes(model: &Model, batch: usize, context: usize, weight_bytes: f64, act_bytes: f64) -> f64 {
    let s = flashc_dsl::stats::model_stats(&model.spec);
    let dtype = model.spec.dtype.size() as f64;
    let per_act = act_bytes / dtype;
    let weights = s.params_total as f64 * weight_bytes;
    let b = batch as f64;
    // States are read and written once per step.
    let recurrent = 2.0 * b * s.recurrent_state_bytes as f64;
    let conv = 2.0 * b * s.conv_state_bytes as f64 * per_act;
    let kv = b * (s.kv_bytes_per_token as f64 * (context as f64 + 1.0) + s.window_kv_bytes as f64) * per_act;
    weights + recurrent + conv + kv
}

/// What to measure, and how the device stores data.
#[derive(Clone, Copy, Debug)]
pub struct BenchConfig {
    pub batch: usize,
    pub prompt: usize,
    pub decode: usize,
    /// Memory bandwidth for the roofline, bytes per second.
    pub bandwidth: f64,
    /// Bytes per weight and per KV/conv element on the device.
    pub weight_bytes: f64,
    pub act_bytes: f64,
}

/// Runs the measurement for one batch size.
pub fn run<D: Device>(device: &D, model: &Model, cfg: &BenchConfig) -> Result<BenchResult, RuntimeError> {
    let BenchConfig { batch, prompt, decode, bandwidth, weight_bytes, act_bytes } = *cfg;
    let vocab = model.spec.vocab as u32;
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..prompt).map(|i| ((b * 7919 + i * 104729 + 13) as u32) % vocab).collect()).collect();
    let mut session = Session::new(device, model, batch)?;
    let t0 = Instant::now();
    let logits = session.prefill(&prompts)?;
    let vocab_n = vocab as usize;
    let mut next: Vec<u32> = logits.iter().map(|l| argmax(&l[l.len().saturating_sub(vocab_n)..])).collect();
    let ttft = t0.elapsed().as_secs_f64();
    session.set_profiling(true);
    let t1 = Instant::now();
    for _ in 0..decode {
        let l = session.decode(&next)?;
        next = l.iter().map(|x| argmax(x)).collect();
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let mut kernels: Vec<KernelTime> = session.take_profile().into_values().collect();
    kernels.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.name.cmp(&b.name)));
    let step = decode_s / decode.max(1) as f64;
    let context = model.spec.meta_tokens as usize + prompt + decode / 2;
    let bytes = decode_bytes(model, batch, context, weight_bytes, act_bytes);
    let floor = bytes / bandwidth.max(1.0);
    Ok(BenchResult {
        batch,
        prompt,
        decode,
        time_to_first_token_ms: 1e3 * ttft,
        prefill_tokens_per_s: (batch * prompt) as f64 / ttft.max(1e-9),
        decode_step_ms: 1e3 * step,
        decode_tokens_per_s: (batch * decode) as f64 / decode_s.max(1e-9),
        decode_bytes_per_step: bytes,
        roofline_step_ms: 1e3 * floor,
        roofline_fraction: if step > 0.0 { floor / step } else { 0.0 },
        decode_kernels: kernels,
    })
}

impl BenchReport {
    /// The report as a table.
    pub fn table(&self, top: usize) -> String {
        let mut s = format!(
            "model {} on {} ({} parameters); bandwidth {:.1} GB/s ({})\n\n",
            self.model,
            self.device,
            self.parameters,
            self.bandwidth_bytes_per_s / 1e9,
            self.bandwidth_source
        );
        s.push_str(&format!(
            "{:>5} {:>6} {:>6} {:>10} {:>12} {:>10} {:>12} {:>11} {:>9}\n",
            "batch", "prompt", "decode", "TTFT ms", "prefill t/s", "step ms", "decode t/s", "floor ms", "achieved"
        ));
        for r in &self.results {
            s.push_str(&format!(
                "{:>5} {:>6} {:>6} {:>10.2} {:>12.1} {:>10.3} {:>12.1} {:>11.3} {:>8.1}%\n",
                r.batch,
                r.prompt,
                r.decode,
                r.time_to_first_token_ms,
                r.prefill_tokens_per_s,
                r.decode_step_ms,
                r.decode_tokens_per_s,
                r.roofline_step_ms,
                100.0 * r.roofline_fraction
            ));
        }
        for r in &self.results {
            let total: f64 = r.decode_kernels.iter().map(|k| k.seconds).sum();
            s.push_str(&format!("\ndecode kernels at batch {} (top {top} of {}):\n", r.batch, r.decode_kernels.len()));
            for k in r.decode_kernels.iter().take(top) {
                s.push_str(&format!(
                    "  {:<40} {:>6} calls {:>10.3} ms/step {:>6.1}%\n",
                    k.name,
                    k.calls,
                    1e3 * k.seconds / r.decode.max(1) as f64,
                    100.0 * k.seconds / total.max(1e-12)
                ));
            }
        }
        s
    }
}

/// Kernel times by kernel name.
pub type Profile = BTreeMap<String, KernelTime>;
