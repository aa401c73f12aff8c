//! Empty library target so that tooling (`cargo metadata`, clippy) can see this crate; the
//! program itself is the `mirage` binary, built for `bpfel-unknown-none` by `agent/build.rs`.
#![no_std]
