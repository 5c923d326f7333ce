//! The `seckill` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the purchase path allocates per request (headers, JSON, Redis frames), and glibc's
/// malloc/free showed up as ~15% of the server's CPU in a profile (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    seckill::cli::run(seckill::cli::Cli::parse())
}
