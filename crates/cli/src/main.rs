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

/// glibc's allocator, except that freed blocks of [`BIG`] bytes and more are kept, up to
/// [`KEEP`] bytes in [`SLOTS`] blocks and for at most [`AGE`], for the next allocation of the
/// same size.
///
/// Kiln's commands run on rayon's threads, and glibc's per-thread arenas cannot hold a block over
/// 64 MiB: each one (a `tiny` step's logits; `small`'s attention probabilities too) is mapped
/// fresh from the system and given back when freed, so every step faulted it in again, 4 KiB at
/// a time (16,400 page faults a `tiny` step, measured). The same shapes come back every step, so
/// a kept block of the same size serves the next one.
struct Alloc;

/// Blocks this large and larger are kept when freed.
const BIG: usize = 32 << 20;
/// Largest alignment of a kept block: burn-flex's SIMD buffers ask for 64 bytes.
const MOST_ALIGN: usize = 64;
/// Most blocks kept at once. A `small` training step frees 18 big blocks (640 MiB) that the
/// next step asks for again; with 8 slots and 512 MiB, 10 of them a step went back to the
/// system and were faulted in afresh (zeroed, 2 MiB at a time): 2.7% of the step's profile,
/// and the step 3.2% faster without it (docs/performance.md, "A seventeenth session").
const SLOTS: usize = 32;
/// Most bytes kept at once.
const KEEP: usize = 1 << 30;
/// Longest a block is kept: one not asked for again by then goes back to the system at the
/// next big allocation or free, so that a phase's blocks (a PPO rollout's, a benchmark's
/// training) do not stay resident through the next phase, whose sizes differ.
const AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// A freed big block: its size, its address, and when it was kept.
#[derive(Clone, Copy)]
struct Block {
    size: usize,
    at: usize,
    since: std::time::Instant,
}

/// Freed big blocks, oldest first: the kept ones fill the first slots, the rest are empty.
struct Kept {
    blocks: [Option<Block>; SLOTS],
    bytes: usize,
}

static KEPT: std::sync::Mutex<Kept> = std::sync::Mutex::new(Kept {
    blocks: [None; SLOTS],
    bytes: 0,
});

impl Kept {
    /// Takes slot `i`'s block out, the later ones moving up (oldest first stays).
    fn remove(&mut self, i: usize) -> Block {
        let b = self.blocks[i].take().expect("a kept block");
        self.bytes -= b.size;
        self.blocks[i..].rotate_left(1);
        b
    }

    /// Keeps `b` in the first empty slot, after the kept ones (oldest first stays).
    fn push(&mut self, b: Block) {
        let free = self
            .blocks
            .iter()
            .position(Option::is_none)
            .expect("a free slot");
        self.blocks[free] = Some(b);
        self.bytes += b.size;
    }

    /// Takes out the blocks kept longer than [`AGE`], and then as many as keeping `more`
    /// bytes in one more slot needs; returns them, to go back to the system once the lock is
    /// released. Both are the oldest, at the front.
    fn evict(&mut self, more: usize) -> [Option<Block>; SLOTS] {
        let mut out = [None; SLOTS];
        let now = std::time::Instant::now();
        let mut n = 0;
        while let Some(b) = self.blocks[0] {
            let stale = now.duration_since(b.since) > AGE;
            let full = more > 0 && (self.bytes + more > KEEP || self.blocks[SLOTS - 1].is_some());
            if !stale && !full {
                break;
            }
            out[n] = Some(self.remove(0));
            n += 1;
        }
        out
    }
}

/// Gives evicted blocks back to the system. A kept block may have been asked for at 16- or
/// 64-byte alignment ([`MOST_ALIGN`]) and is given back at 16: `System` frees every block on
/// Unix with `free`, which reads no alignment.
///
/// # Safety
/// Each block must have come from `System` with its size and be in use nowhere.
unsafe fn release(blocks: &[Option<Block>]) {
    use std::alloc::GlobalAlloc as _;
    for b in blocks.iter().flatten() {
        let l = std::alloc::Layout::from_size_align_unchecked(b.size, 16);
        std::alloc::System.dealloc(b.at as *mut u8, l);
    }
}

/// Whether [`Alloc`] keeps blocks (not with `KILN_DEFAULT_MALLOC`; set in `main`).
static KEEP_BLOCKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Alloc {
    fn cached(layout: std::alloc::Layout) -> bool {
        // Larger alignments than burn's go to `System` as they are.
        layout.size() >= BIG
            && layout.align() <= MOST_ALIGN
            && KEEP_BLOCKS.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A kept block of exactly `size` bytes at an address aligned to `align`, taken out of
    /// the cache; blocks kept too long go back to the system on the way.
    fn take(size: usize, align: usize) -> Option<*mut u8> {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        let old = kept.evict(0);
        let found = kept
            .blocks
            .iter()
            .flatten()
            .position(|b| b.size == size && b.at % align == 0)
            .map(|i| kept.remove(i).at as *mut u8);
        drop(kept);
        // SAFETY: evicted blocks came from `System` with their size and are in use nowhere.
        unsafe { release(&old) };
        found
    }
}

// SAFETY: every block comes from `System` and goes back to it with the layout it was made for
// (a kept block is handed out again only for that same size, with alignment at most 16).
unsafe impl std::alloc::GlobalAlloc for Alloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::cached(layout) {
            if let Some(p) = Self::take(layout.size(), layout.align()) {
                return p;
            }
        }
        std::alloc::System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::cached(layout) {
            if let Some(p) = Self::take(layout.size(), layout.align()) {
                std::ptr::write_bytes(p, 0, layout.size());
                return p;
            }
        }
        std::alloc::System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: std::alloc::Layout) {
        if Self::cached(layout) && layout.size() <= KEEP {
            let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
            // Room for it: stale blocks, then the oldest, go back to the system first.
            let evicted = kept.evict(layout.size());
            kept.push(Block {
                size: layout.size(),
                at: p as usize,
                since: std::time::Instant::now(),
            });
            drop(kept);
            release(&evicted);
            return;
        }
        std::alloc::System.dealloc(p, layout)
    }

    unsafe fn realloc(&self, p: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        let new = std::alloc::Layout::from_size_align_unchecked(size, layout.align());
        if !Self::cached(layout) && !Self::cached(new) {
            return std::alloc::System.realloc(p, layout, size);
        }
        let q = self.alloc(new);
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(p, q, layout.size().min(size));
            self.dealloc(p, layout);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Alloc = Alloc;

/// glibc's tunable that makes malloc advise 2 MiB pages (`MADV_HUGEPAGE`) on all the memory it
/// gets from the system: its arenas' heaps, the main heap's growth and mapped blocks.
const HUGE_PAGES: &str = "glibc.malloc.hugetlb=1";

/// Restarts this process once with [`HUGE_PAGES`] where the system gives transparent huge pages
/// only to memory that asks for them (THP mode `madvise`, the common default). glibc reads its
/// tunables once, before `main`, so turning one on takes an `exec` of the same binary with the
/// same arguments and descriptors; nothing has run yet. Not done where `GLIBC_TUNABLES` already
/// names the tunable (set to 0 by a user, or by the restart itself, which is how the restarted
/// process knows), with `KILN_DEFAULT_MALLOC`, or where the exec fails (it then goes on as it
/// is).
///
/// Measured on a 2-core Zen 4 with the kept blocks above, pairs alternating with and without:
/// `tiny` training +2.4% (6 of 6 pairs faster), SFT full +2.3%, LoRA +3%, reward +2.2%, a PPO
/// iteration at TRL's shapes +0.5-0.9% (its scoring pass 1.3% slower, 8% in a 3-iteration run
/// while the memory is first touched), generation +6% at batch 1 and +3% at batch 16, `small`
/// training and `tiny` bf16 training even (docs/performance.md,
/// "A sixteenth session"): fewer TLB misses where the products and decoding walk weights and
/// activations row by row. An earlier session had tried it without the kept blocks; then
/// `small` trained 12% slower, its blocks over 64 MiB mapped fresh and zeroed in 2 MiB pages
/// every step.
fn restart_with_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        // A value that is not UTF-8 is left as it is, untouched.
        let tunables = match std::env::var("GLIBC_TUNABLES") {
            Ok(t) => t,
            Err(std::env::VarError::NotPresent) => String::new(),
            Err(std::env::VarError::NotUnicode(_)) => return,
        };
        if hugetlb(&tunables).is_some() {
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
            HUGE_PAGES.to_string()
        } else {
            format!("{tunables}:{HUGE_PAGES}")
        };
        // Returns only where the exec failed; the process then goes on as it is.
        let _ = std::process::Command::new(&exe)
            .arg0(arg0)
            .args(args)
            .env("GLIBC_TUNABLES", value)
            .exec();
    }
}

/// Whether this process runs with glibc's huge pages on ([`restart_with_huge_pages`], or a
/// user's own `GLIBC_TUNABLES`: 1 for transparent huge pages, 2 for hugetlbfs pages), as
/// `kiln bench` reports it.
pub fn huge_pages() -> bool {
    std::env::var("GLIBC_TUNABLES").is_ok_and(|t| matches!(hugetlb(&t), Some("1" | "2")))
}

/// The value `GLIBC_TUNABLES` (`name=value` pairs joined by `:`) gives glibc's huge-page
/// tunable, if it names it.
fn hugetlb(tunables: &str) -> Option<&str> {
    tunables
        .split(':')
        .find_map(|t| t.strip_prefix("glibc.malloc.hugetlb="))
}

fn main() -> ExitCode {
    if std::env::var_os("KILN_DEFAULT_MALLOC").is_none() {
        restart_with_huge_pages();
        kiln_model::tune_allocator();
        KEEP_BLOCKS.store(true, std::sync::atomic::Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn freed_big_blocks_serve_the_next_allocation_of_their_size_within_bounds() {
        KEEP_BLOCKS.store(true, Relaxed);
        let l = Layout::from_size_align(BIG + 4096, 16).unwrap();
        // SAFETY: each block is used within its layout and freed once with it.
        unsafe {
            let p = Alloc.alloc(l);
            p.write_bytes(7, l.size());
            Alloc.dealloc(p, l);
            let q = Alloc.alloc_zeroed(l);
            assert_eq!(q, p, "the kept block is handed out again");
            let bytes = std::slice::from_raw_parts(q, l.size());
            assert!(
                bytes.iter().all(|&b| b == 0),
                "alloc_zeroed zeroes a kept block"
            );
            Alloc.dealloc(q, l);
            // More than KEEP bytes freed at once: the oldest go back, and the cache stays
            // within its bounds.
            let big = Layout::from_size_align(KEEP / 4 + 16, 16).unwrap();
            let ps: Vec<*mut u8> = (0..6).map(|_| Alloc.alloc(big)).collect();
            for &p in &ps {
                Alloc.dealloc(p, big);
            }
        }
        let mut kept = KEPT.lock().unwrap();
        assert!(kept.bytes <= KEEP, "{} bytes kept", kept.bytes);
        let kept_blocks = |k: &Kept| k.blocks.iter().flatten().copied().collect::<Vec<Block>>();
        assert_eq!(
            kept.bytes,
            kept_blocks(&kept).iter().map(|b| b.size).sum::<usize>()
        );
        assert_eq!(
            kept_blocks(&kept)
                .iter()
                .filter(|b| b.size == KEEP / 4 + 16)
                .count(),
            3,
            "three of the six fit"
        );
        // Blocks kept longer than AGE go back at the next big allocation or free.
        let long_ago = std::time::Instant::now() - AGE - std::time::Duration::from_secs(1);
        for b in kept.blocks.iter_mut().flatten().take(2) {
            b.since = long_ago;
        }
        drop(kept);
        assert!(Alloc::take(1 << 40, 16).is_none(), "no block of that size");
        let kept = KEPT.lock().unwrap();
        assert_eq!(
            kept_blocks(&kept).len(),
            1,
            "the two stale blocks went back"
        );
        assert_eq!(kept.bytes, KEEP / 4 + 16);
        drop(kept);
        // A block asked for at 64-byte alignment is kept, and serves that alignment again; a
        // kept block at a 16-byte address does not serve it.
        let aligned = Layout::from_size_align(BIG + 8192, 64).unwrap();
        // SAFETY: as above; the block whose address is made up below is freed at its real one.
        unsafe {
            let p = Alloc.alloc(aligned);
            assert_eq!(p as usize % 64, 0);
            Alloc.dealloc(p, aligned);
            assert_eq!(Alloc.alloc(aligned), p, "the kept aligned block");
            Alloc.dealloc(p, aligned);
            let mut kept = KEPT.lock().unwrap();
            let b = kept
                .blocks
                .iter_mut()
                .flatten()
                .find(|b| b.size == BIG + 8192)
                .unwrap();
            b.at += 16; // as if at a 16-byte address
            let at = b.at;
            drop(kept);
            assert!(Alloc::take(BIG + 8192, 64).is_none(), "misaligned for 64");
            assert_eq!(Alloc::take(BIG + 8192, 16), Some(at as *mut u8));
            std::alloc::System.dealloc(p, aligned);
        }
    }
}
