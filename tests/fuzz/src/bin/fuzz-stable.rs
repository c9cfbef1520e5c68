//! Stable-Rust fuzz driver: runs every entry point of `livemig_fuzz` over
//! random and mutated inputs without libFuzzer or a nightly toolchain, so CI
//! can fuzz every push for a bounded time.
//!
//! `fuzz-stable --iterations N [--seed S]` feeds each target N inputs: a
//! quarter random bytes, the rest mutations (bit flips, byte insertions and
//! deletions, truncation, splicing) of the target's corpus of valid inputs.
//! Each input runs under `catch_unwind`; the driver prints one summary line
//! per target and exits non-zero if any input panicked. The same seed gives
//! the same inputs, so a failure reproduces.

use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;

/// One fuzz entry point.
struct Target {
    /// Name printed in the summary.
    name: &'static str,
    /// Runs one input; returns whether the input was valid (decoded without
    /// error). Panics are the failures being hunted.
    run: fn(&[u8]) -> bool,
    /// Valid inputs to mutate (may be empty: then only random bytes).
    corpus: fn() -> Vec<Vec<u8>>,
}

/// Every target. Adding one is one line; an entry point with no validity
/// verdict fits as `run: |d| { f(d); false }`, one without corpus as
/// `corpus: Vec::new`.
const TARGETS: &[Target] = &[
    Target {
        name: "return_path",
        run: livemig_fuzz::return_path_accepts,
        corpus: livemig_fuzz::return_path_corpus,
    },
    Target {
        name: "stream",
        run: livemig_fuzz::stream_accepts,
        corpus: livemig_fuzz::stream_corpus,
    },
    Target {
        name: "source",
        run: livemig_fuzz::source_accepts,
        corpus: livemig_fuzz::source_corpus,
    },
    Target {
        name: "destination",
        run: livemig_fuzz::destination_accepts,
        corpus: livemig_fuzz::destination_corpus,
    },
    Target {
        name: "multifd",
        run: livemig_fuzz::multifd_accepts,
        corpus: livemig_fuzz::multifd_corpus,
    },
    Target {
        name: "preempt",
        run: livemig_fuzz::preempt_accepts,
        corpus: livemig_fuzz::preempt_corpus,
    },
    Target {
        name: "x86_vcpu_state",
        run: livemig_fuzz::x86_vcpu_state_accepts,
        corpus: livemig_fuzz::x86_vcpu_state_corpus,
    },
    Target {
        name: "x86_vm_state",
        run: livemig_fuzz::x86_vm_state_accepts,
        corpus: livemig_fuzz::x86_vm_state_corpus,
    },
    Target {
        name: "x86_cpu_model",
        run: livemig_fuzz::x86_cpu_model_accepts,
        corpus: livemig_fuzz::x86_cpu_model_corpus,
    },
    Target {
        name: "qmp",
        run: livemig_fuzz::qmp_accepts,
        corpus: livemig_fuzz::qmp_corpus,
    },
];

/// Longest input generated; return-path messages are at most 272 bytes,
/// so this covers several messages and over-long headers.
const MAX_LEN: usize = 8192;

/// How many failing inputs to print in full per target.
const SHOW_FAILURES: usize = 3;

/// SplitMix64: a tiny, fast, deterministic generator; quality is ample for
/// choosing mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough value in `0..bound` (`bound` > 0).
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Bytes that tend to matter to decoders: boundaries of lengths and types.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x07, 0x08, 0x0c, 0x0d, 0x10, 0x7f, 0x80, 0xfe, 0xff,
];

fn random_input(rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(MAX_LEN / 4);
    (0..len).map(|_| rng.byte()).collect()
}

/// Applies one to four random mutations to a copy of a corpus entry.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            // Flip one bit.
            0 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] ^= 1 << rng.below(8);
            }
            // Overwrite a byte with an interesting value.
            1 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            // Insert a few bytes.
            2 => {
                let at = rng.below(input.len() + 1);
                for _ in 0..=rng.below(4) {
                    input.insert(at, rng.byte());
                }
            }
            // Delete a few bytes.
            3 if !input.is_empty() => {
                let at = rng.below(input.len());
                let end = (at + 1 + rng.below(4)).min(input.len());
                input.drain(at..end);
            }
            // Truncate.
            4 => {
                let keep = rng.below(input.len() + 1);
                input.truncate(keep);
            }
            // Splice: our prefix, another entry's suffix.
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(input.len() + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            // Append another whole entry (its control byte becomes stream
            // bytes, shifting the framing).
            _ => {
                let other = &corpus[rng.below(corpus.len())];
                input.extend_from_slice(other);
            }
        }
    }
    input.truncate(MAX_LEN);
    input
}

struct Summary {
    inputs: u64,
    panics: u64,
    accepted: u64,
}

fn fuzz(target: &Target, iterations: u64, seed: u64) -> Summary {
    // Derive a per-target stream so adding a target does not change the
    // inputs of the others.
    let salt = target.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng(seed ^ salt);
    let corpus = (target.corpus)();
    let mut summary = Summary {
        inputs: 0,
        panics: 0,
        accepted: 0,
    };
    for _ in 0..iterations {
        let input = if corpus.is_empty() || rng.below(4) == 0 {
            random_input(&mut rng)
        } else {
            mutate(&mut rng, &corpus)
        };
        summary.inputs += 1;
        match panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
            Ok(true) => summary.accepted += 1,
            Ok(false) => {}
            Err(_) => {
                summary.panics += 1;
                if summary.panics <= SHOW_FAILURES as u64 {
                    eprintln!("{}: panicking input: {}", target.name, hex(&input));
                }
            }
        }
    }
    summary
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Args {
    iterations: u64,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        iterations: 10_000,
        seed: 0x6c69_7665_6d69_6721,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = value
            .parse::<u64>()
            .map_err(|e| format!("{flag} {value}: {e}"))?;
        match flag.as_str() {
            "--iterations" => args.iterations = number,
            "--seed" => args.seed = number,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("fuzz-stable: {err}\nusage: fuzz-stable --iterations N [--seed S]");
            return ExitCode::from(2);
        }
    };
    // Panics are counted and the input printed; the default hook's message
    // (with location) is kept for the first few only.
    let default_hook = panic::take_hook();
    let shown = std::sync::atomic::AtomicUsize::new(0);
    panic::set_hook(Box::new(move |info| {
        if shown.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < SHOW_FAILURES {
            default_hook(info);
        }
    }));
    let mut failed = false;
    for target in TARGETS {
        let s = fuzz(target, args.iterations, args.seed);
        println!(
            "{}: {} inputs, {} panics, {} decoded ok",
            target.name, s.inputs, s.panics, s.accepted
        );
        failed |= s.panics > 0;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
