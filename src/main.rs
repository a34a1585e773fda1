//! `xent`: cross-entropy, perplexity and accuracy over `.npy` / `.safetensors` logits, on the GPU.
//!
//! This file only parses the command line and dispatches; each command lives in its own module
//! under `cli/`, and what several share in `cli/mod.rs`.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xent",
    version,
    about = "Fused cross-entropy over huge logits on the GPU (wgpu), checked against an f64 CPU reference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score logits against targets: mean nll, perplexity ± stderr, bits per token, accuracy.
    Score(cli::score::ScoreArgs),
    /// Time the GPU kernel and the CPU paths on generated logits.
    Bench(cli::bench::BenchArgs),
    /// Show the adapter, backend, features and the limits the kernels plan with.
    Info(cli::info::InfoArgs),
    /// Generate a realistic evaluation set, score it on GPU and CPU, show agreement and speed.
    Demo(cli::demo::DemoArgs),
    /// Write a generated evaluation set (Zipf-like logits, sampled targets) to files, in bounded memory.
    Gen(cli::gen::GenArgs),
    /// KL divergence of a test model from a base model (llama.cpp's statistics); the base may be a llama.cpp base file.
    Kld(cli::kld::KldArgs),
    /// Write a llama.cpp --kl-divergence-base file from [n_chunk, n_ctx, V] logits and their tokens.
    KldBase(cli::kld_base::KldBaseArgs),
    /// Merge summaries of shards scored separately (`score` or `kld --summary-out`): exactly the summary of one run.
    Merge(cli::merge::MergeArgs),
}

fn main() -> ExitCode {
    quiet_headless_vulkan();
    let cli = Cli::parse();
    on_sigbus_exit_cleanly();
    let result = match cli.command {
        Command::Score(a) => cli::score::run(&a),
        Command::Bench(a) => cli::bench::run(&a),
        Command::Info(a) => cli::info::run(&a),
        Command::Demo(a) => cli::demo::run(&a),
        Command::Gen(a) => cli::gen::run(&a),
        Command::Kld(a) => cli::kld::run(&a),
        Command::KldBase(a) => cli::kld_base::run(&a),
        Command::Merge(a) => cli::merge::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Without `XDG_RUNTIME_DIR` (a headless machine, a container, CI), Mesa's Vulkan drivers print
/// "error: XDG_RUNTIME_DIR is invalid or not set" twice while probing for a Wayland display that
/// xent never uses: the line is harmless but reads like a failure. Point it at the temporary
/// directory when it is unset, first thing, while the process has one thread.
fn quiet_headless_vulkan() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}

/// Input files are read through memory maps where that is zero-copy; if another process truncates a
/// file in the instant between a block's population (checked) and its reads, the kernel raises
/// SIGBUS. Turn that into the same kind of one-line error as every other bad input, with a
/// non-zero exit. Outputs are only written after scoring, so nothing is left half-written.
/// Linux only: that is where the zero-copy path runs, and where a stack overflow raises SIGSEGV
/// (not SIGBUS), so std's overflow report is not shadowed.
fn on_sigbus_exit_cleanly() {
    #[cfg(target_os = "linux")]
    {
        /// `si_code` of a SIGBUS for an access to a nonexistent part of a mapped object (Linux's
        /// asm-generic/siginfo.h; the libc crate does not export it for Linux).
        const BUS_ADRERR: libc::c_int = 2;
        extern "C" fn handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
            const MSG: &[u8] = b"xent: error: an input file was truncated or replaced while being read (SIGBUS)\n";
            // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO; write(2), _exit(2) and
            // signal(2) are async-signal-safe.
            unsafe {
                if (*info).si_code == BUS_ADRERR {
                    libc::write(2, MSG.as_ptr().cast(), MSG.len());
                    libc::_exit(1);
                }
                // Any other bus error (a hardware memory error, a misaligned access) is not ours
                // to explain: restore the default action, and returning re-raises it.
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction =
                handler as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    }
}
