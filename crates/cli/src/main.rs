//! `kiln`: the command-line entry point. Parses arguments, sets up logging and the allocator
//! once, runs one subcommand, and prints the error chain (never a panic) on failure.

mod bench;
mod chat;
mod data_cmd;
mod eval;
mod generate;
mod model_cmd;
mod peft_cmd;
mod ppo;
mod pretrain;
mod report;
mod reward;
mod run;
mod sft;
mod tokenizer_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build language models in four stages: pretrain, sft, reward, ppo"
)]
struct Cli {
    /// Threads for tensor work (0 = all cores).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(tokenizer_cmd::TokenizerCmd),
    /// Model directory tools (create an untrained model, inspect one).
    #[command(subcommand)]
    Model(model_cmd::ModelCmd),
    /// Generate a continuation of a prompt, streaming it as it is produced.
    Generate(generate::GenerateArgs),
    /// Chat with a model in the terminal (chat template, streaming, history).
    Chat(chat::ChatArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(eval::EvalCmd),
    /// Measure training and generation throughput.
    Bench(bench::BenchArgs),
    /// Built-in world and data preparation.
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
    /// Pre-train a base model on a corpus.
    Pretrain(pretrain::PretrainArgs),
    /// Supervised fine-tuning on demonstrations (chat data).
    Sft(sft::SftArgs),
    /// Fold a LoRA adapter into its base model: a plain model directory.
    Merge(peft_cmd::MergeArgs),
    /// Train a reward model on preference pairs.
    Reward(reward::RewardArgs),
    /// Score examples with a reward model, or measure its accuracy on preference pairs.
    Score(reward::ScoreArgs),
    /// Reinforcement learning with PPO-ptx against a reward model.
    Ppo(ppo::PpoArgs),
    /// The whole pipeline on the built-in world: tokenizer, pretrain, sft, then a report.
    Run(run::RunArgs),
}

/// glibc's default mmap/trim thresholds return freed activation buffers to the OS and fault
/// them back in at the next step; measured at up to 40% of a CPU training step. Raise them once
/// at start-up so freed blocks stay in the heap.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Restarts this process with glibc's transparent-huge-page switch on
/// (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: malloc asks for 2 MiB pages, `MADV_HUGEPAGE`, on all
/// the memory it gets from the system) where the system gives huge pages only to memory that asks
/// (THP mode `madvise`, the common default). glibc reads its tunables once, before `main`, so
/// setting one takes an `exec` of the same binary with the same arguments.
///
/// Measured on `tiny` training (2-core Xeon, three alternations): f32 7,750-7,850 -> 8,000-8,360
/// tokens/s, bf16 12,400-12,660 -> 13,240-13,590; peak memory +8 MB. A `tiny` step's 64 MiB of
/// logits alone took 16,400 page faults a step before (rayon's threads get blocks over 64 MiB
/// freshly mapped from glibc), and the head's product ran at half speed for it; the rest of the
/// gain is fewer TLB misses. An allocator that advised only large blocks itself gained 0-3.5%.
/// Not done when the variable already names the tunable (which is how the restarted process
/// knows), with `KILN_DEFAULT_MALLOC`, or when the exec fails (it then runs as it is). Called
/// for the training commands and `bench` only, after the arguments are parsed; nothing else has
/// run yet.
fn restart_with_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        const TUNABLE: &str = "glibc.malloc.hugetlb=1";
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if tunables.contains("glibc.malloc.hugetlb") {
            return;
        }
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if !mode.is_ok_and(|m| m.contains("[madvise]")) {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        let value = if tunables.is_empty() {
            TUNABLE.to_string()
        } else {
            format!("{tunables}:{TUNABLE}")
        };
        // Returns only when the exec failed; the process then goes on as it is.
        let _ = std::process::Command::new(&exe)
            .arg0(arg0)
            .args(args)
            .env("GLIBC_TUNABLES", value)
            .exec();
    }
}

fn main() -> ExitCode {
    let default_malloc = std::env::var_os("KILN_DEFAULT_MALLOC").is_some();
    if !default_malloc {
        tune_allocator();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let cli = Cli::parse();
    // Huge pages for the commands that run long: the kernel may compact memory to find them,
    // which has cost up to a second at start-up (measured), more than a short command gains.
    let long = matches!(
        cli.command,
        Command::Run(_)
            | Command::Pretrain(_)
            | Command::Sft(_)
            | Command::Reward(_)
            | Command::Ppo(_)
            | Command::Bench(_)
    );
    if long && !default_malloc {
        restart_with_huge_pages();
    }
    // Ctrl-C: the trainer saves a checkpoint at the end of the current step and stops; a second
    // Ctrl-C exits at once.
    let _ = ctrlc::set_handler(|| {
        if kiln_train::STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
    });
    kiln_model::set_threads(cli.threads);
    // The command runs on a thread of rayon's pool rather than on the main thread. A parallel
    // operation started from outside the pool hands its tasks to the pool and then sleeps until
    // they are done, so each one costs two thread wake-ups: measured on a 2-core VM, 25-30 µs a
    // call (`examples/rayon_overhead.rs`), against 1-2 µs from inside it, where the caller works
    // on its own share and the other worker steals the rest.
    let result = rayon::scope(|_| match cli.command {
        Command::Tokenizer(cmd) => tokenizer_cmd::run(cmd),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Generate(args) => generate::run(args),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Pretrain(args) => pretrain::run(args).map(|_| ()),
        Command::Sft(args) => sft::run(args).map(|_| ()),
        Command::Run(args) => run::run(args),
        Command::Merge(args) => peft_cmd::merge(args),
        Command::Reward(args) => reward::run(args).map(|_| ()),
        Command::Score(args) => reward::score(args),
        Command::Ppo(args) => ppo::run(args).map(|_| ()),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
