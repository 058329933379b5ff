//! The `topoplace` binary: parses the command line and maps errors to exit codes
//! (2: bad input, 1: anything else). All the work is in the library.

use clap::Parser;

/// mimalloc rather than the system allocator: the server allocates a request on an async
/// worker and frees part of it on the book's thread (and back), which glibc's malloc
/// serialises on its arena locks. The benchmarks declare the same allocator
/// (`benches/support/allocator.rs`), so they measure what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = topoplace::cli::Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Err(error) = topoplace::cli::run(cli, &mut out) {
        eprintln!("topoplace: {error}");
        std::process::exit(error.exit_code());
    }
}
