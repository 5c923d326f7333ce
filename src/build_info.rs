//! What this binary was built from: one definition for `seckill --version` and the
//! `seckill_build_info{version, commit}` metric.

/// The crate's version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit built, 12 hex digits, or `unknown` when the build had no repository (e.g. a
/// Docker build context without `.git` and no `GIT_COMMIT` build argument); set by `build.rs`.
pub const COMMIT: &str = env!("BUILD_GIT_COMMIT");

/// `VERSION (COMMIT)`, as `seckill --version` prints it.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BUILD_GIT_COMMIT"),
    ")"
);
