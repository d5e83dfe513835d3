//! The `twinwatch` binary: parse the command line, set up logging, run the command.

use std::alloc::{GlobalAlloc, Layout};
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: Allocator = Allocator;

/// mimalloc, through its plain entry points where the alignment asked for is one every
/// mimalloc block has (8 bytes; nearly every allocation of this program): `mimalloc::MiMalloc`
/// calls the aligned ones for everything, which take a longer path (about 40 instructions a
/// call rather than 20, and the apply thread allocates some 30 times an event).
struct Allocator;

/// The alignment of every block mimalloc hands out (a machine word).
const MI_MIN_ALIGN: usize = 8;

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` and `mi_realloc`
// take a block of either entry point); the plain entry points are used only when their
// blocks' alignment satisfies the layout's, the aligned ones otherwise.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN {
            // SAFETY: any size is valid; a null return is the allocation failure.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: forwarded as given.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN {
            // SAFETY: as for `alloc`.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: forwarded as given.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` is a live block of this allocator (the caller's contract).
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN {
            // SAFETY: `ptr` is a live block of this allocator; the new block keeps the
            // alignment every block has.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: forwarded as given.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

fn main() -> ExitCode {
    // With the `failpoints` feature, `FAILPOINTS` arms crash spots (the reliability suite).
    #[cfg(feature = "failpoints")]
    let _failpoints = twinwatch::failpoint::setup();
    let cli = twinwatch::cli::Cli::parse();
    twinwatch::telemetry::init_logging(cli.log_format);
    twinwatch::app::run(cli)
}
