//! The `topoplace` binary: parses the command line and maps errors to exit codes
//! (2: bad input, 1: anything else). All the work is in the library.

use clap::Parser;

fn main() {
    let cli = topoplace::cli::Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Err(error) = topoplace::cli::run(cli, &mut out) {
        eprintln!("topoplace: {error}");
        std::process::exit(error.exit_code());
    }
}
