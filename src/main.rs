//! The `seckill` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    seckill::cli::run(seckill::cli::Cli::parse())
}
