//! Shared harness for the end-to-end tests: runs the real `kiln` binary against a data
//! directory and a config of the test's own (`run`), with the file backends' fixture —
//! raw+reflink on a real loop-mounted XFS and qcow2 (real qemu-img) on a plain directory —
//! in `files`, and helpers on JSON output and bytes in `data`. The RBD and LVM tests build
//! the same harness from their own config and fixture (`Kiln::with_config`).
// Each test file uses a different subset of the helpers and of the re-exports below.
#![allow(dead_code, unused_imports)]

mod data;
mod files;
pub mod guest;
pub mod lvm;
pub mod rbd;
mod run;

pub use data::{
    apply_stream, assert_bench_timings, assert_same_bytes, backend_row, image, s, sha256_hex,
    write_at,
};
pub use files::{chain_record, listing, tree};
pub use run::{Kiln, Runner, TEST_NODE, check_failure, run_bounded, serial, unique_token};
