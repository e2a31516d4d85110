//! `holepunch`: parse the command line, load the config, set up logging, and hand over to
//! the command (the daemon for `run`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = holepunch::cli::Cli::parse();
    holepunch::cli::execute(cli)
}
