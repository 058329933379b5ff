//! The shipped binary's allocator (`src/main.rs`), so each benchmark measures what ships.
//! Included by every benchmark: `#[path = "support/allocator.rs"] mod allocator;`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
