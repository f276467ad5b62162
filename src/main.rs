//! The `rlhf-bot` binary: parse arguments, set up logging, run, and map the outcome to an exit
//! code (0 success — including "no retraining needed" —, 1 runtime error, 2 usage or config error).

use clap::Parser;

use rlhf_bot::{app, cli::Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    app::init_logging(cli.verbose, cli.quiet);
    // The benchmarks measure training with these allocator settings (GUIDE §4: glibc's default
    // returns large freed blocks to the OS, and page faults then cost a large share of a step);
    // production must run with what was measured.
    let tuned = rlhf_bot::kernels::tune_allocator();
    tracing::debug!(
        tuned,
        "glibc malloc tuned: no mmap for large blocks, no trimming"
    );
    // Subnormal floats cost ~100x per operation on Intel cores (see `kernels::threads`):
    // every thread that runs kernels flushes them, as the benchmarks do.
    if let Err(e) = rlhf_bot::kernels::init_compute_threads(None) {
        tracing::debug!("compute thread pool already configured: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            rlhf_bot::kernels::flush_denormals_on_this_thread();
        })
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(app::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The chain can quote what a server or a file said: print it neutralised.
            let message = format!("{err:#}");
            eprintln!("error: {}", rlhf_bot::sanitize::terminal_block(&message));
            rlhf_bot::forge::actions::ActionsEnv::from_env().error_annotation(&message);
            std::process::ExitCode::from(app::exit_code(&err))
        }
    }
}
