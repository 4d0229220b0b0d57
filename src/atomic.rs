//! Atomic output files: written under a temporary name in the destination directory, then renamed,
//! so that an interrupted run never leaves a partial file and readers see the old or the new one.

use std::fs::Permissions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use tempfile::NamedTempFile;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Turns Ctrl-C and SIGTERM into an error at the next [`check_interrupt`], so that long work stops
/// cleanly and temporary files are removed as the error unwinds.
pub fn install_interrupt_handler() {
    // A second handler cannot be installed (tests call this more than once): ignore that.
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
}

/// Fails once an interrupt was received.
pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; no output was written");
    }
    Ok(())
}

/// The directory a file path lies in: its parent, or `.` for a bare file name.
pub fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Where a path leads once symlinks and `..` are resolved: the file itself where it exists, else
/// its resolved directory joined with its name.
fn resolved(path: &Path) -> Option<std::path::PathBuf> {
    std::fs::canonicalize(path)
        .ok()
        .or_else(|| Some(std::fs::canonicalize(dir_of(path)).ok()?.join(path.file_name()?)))
}

/// Fails if `output` is a directory or, after symlinks and `..`, one of the files the command
/// reads.
fn not_an_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    anyhow::ensure!(!output.is_dir(), "refusing to write {}: it is a directory", output.display());
    let Some(out) = resolved(output) else { return Ok(()) };
    for input in inputs {
        if resolved(input).is_some_and(|i| i == out) {
            bail!(
                "refusing to write {} over the input {}: the command reads it",
                output.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Fails early, before any long work, if `output` cannot be written: the nearest existing ancestor
/// of its directory is not a directory, or it is one of the files the command reads (`inputs`).
///
/// The one rule for output directories, in every command: missing ones are created (with their
/// parents, as `mkdir -p`) by [`create_dir`] when the output is written, so that a command that
/// fails earlier creates nothing.
pub fn check_output(output: &Path, inputs: &[&Path]) -> Result<()> {
    let dir = dir_of(output);
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("."));
    anyhow::ensure!(
        existing.is_dir(),
        "cannot create output directory {}: {} is not a directory",
        dir.display(),
        existing.display()
    );
    not_an_input(output, inputs)
}

/// Creates the directory `output` goes into, with its parents.
pub fn create_dir(output: &Path) -> Result<()> {
    let dir = dir_of(output);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create output directory {}", dir.display()))
}

/// A temporary file in the directory `path` will be written to.
pub fn temp_beside(path: &Path) -> Result<NamedTempFile> {
    let dir = dir_of(path);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))
}

/// Gives the finished temporary file its final name, readable by others like any output
/// (temporary files are created private).
pub fn persist(tmp: NamedTempFile, path: &Path) -> Result<()> {
    check_interrupt()?;
    tmp.as_file().sync_all().with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(tmp.path(), Permissions::from_mode(0o644))?;
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    persist(tmp, path)
}
