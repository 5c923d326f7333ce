//! Build script: records the git commit the binary is built from, for `seckill --version` and
//! the `seckill_build_info` metric (both read it through `src/build_info.rs`).
//!
//! Sets `BUILD_GIT_COMMIT` for the compiler to, in order: `GIT_COMMIT` from the build's environment (a Docker
//! build, whose context has no `.git`, can pass it as a build argument), else
//! `git rev-parse --short=12 HEAD`, else `unknown` (no git, or no repository). It reruns only
//! when `HEAD` or the ref it points to moves, so editing sources never reruns it. (No `-dirty`
//! mark: telling dirty from clean would mean rerunning on every edit.) The name must not start
//! with `SECKILL_`: `cargo run` and `cargo test` also put a build script's `rustc-env` values in
//! the environment of the program they run, and the configuration refuses unknown `SECKILL_*`
//! variables.

use std::{path::Path, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    let commit = std::env::var("GIT_COMMIT")
        .ok()
        .map(|c| short(c.trim()))
        .filter(|c| !c.is_empty())
        .or_else(|| {
            watch_head();
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
}

/// A full hexadecimal commit id shortened to 12 characters; anything else as it is.
fn short(commit: &str) -> String {
    if commit.len() > 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        commit[..12].to_owned()
    } else {
        commit.to_owned()
    }
}

/// Reruns this script when HEAD moves: `HEAD` itself (a checkout), the ref it points to (a
/// commit), and `packed-refs` (where that ref may live instead). Paths come from git, so a
/// worktree (whose `.git` is a file) works too; only existing files are named, since cargo
/// reruns on every build for a file that does not exist.
fn watch_head() {
    let mut files = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(target) = git(&["symbolic-ref", "-q", "HEAD"]) {
        files.push(target);
    }
    for file in files {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &file])
            && Path::new(&path).is_file()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// The trimmed output of a git command that succeeded, if any.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
