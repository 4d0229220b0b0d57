//! Atomic output files: written under a temporary name in the destination directory, then renamed,
//! so that an interrupted run never leaves a partial file and readers see the old or the new one.

use std::fs::Permissions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
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
        bail!("interrupted; no output is left");
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

/// Files one command writes as a whole: a model, its data, its companions and its report. Each is
/// staged under a temporary name beside its final path; [`OutputSet::commit`] then gives them
/// their names in the order staged (a model's data before the model). If a name cannot be given,
/// or an interrupt arrives between two files, every file of the set already renamed is removed
/// again (a file it replaced is put back), the directories the set created are removed, and the
/// error names what was removed: no part of a set is left.
#[derive(Default)]
pub struct OutputSet {
    staged: Vec<(NamedTempFile, PathBuf)>,
    /// Directories created for the set, outermost first.
    created: Vec<PathBuf>,
}

/// An environment variable for tests of interruption: before giving the file of this name its
/// name, the writer creates `<path>.paused` and waits (up to a minute) for an interrupt.
const PAUSE_BEFORE: &str = "NBL_TEST_PAUSE_BEFORE_RENAME";

impl OutputSet {
    pub fn new() -> OutputSet {
        OutputSet::default()
    }

    /// Creates the missing directories `path` goes into, as part of the set (removed again if it
    /// is not committed).
    pub fn create_dir_for(&mut self, path: &Path) -> Result<()> {
        let missing: Vec<PathBuf> = dir_of(path)
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
            .map(Path::to_path_buf)
            .collect();
        create_dir(path)?;
        self.created.extend(missing.into_iter().rev());
        Ok(())
    }

    /// A temporary file that becomes `path` at commit; missing directories are created.
    pub fn stage(&mut self, path: &Path) -> Result<&mut std::fs::File> {
        self.create_dir_for(path)?;
        let tmp = temp_beside(path)?;
        self.staged.push((tmp, path.to_path_buf()));
        Ok(self.staged.last_mut().expect("just staged").0.as_file_mut())
    }

    /// `bytes` as `path`.
    pub fn stage_bytes(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.stage(path)?.write_all(bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// A copy of the file `from` as `path`.
    pub fn stage_copy(&mut self, from: &Path, path: &Path) -> Result<()> {
        let mut source = std::fs::File::open(from).with_context(|| format!("reading {}", from.display()))?;
        let file = self.stage(path)?;
        std::io::copy(&mut source, file)
            .with_context(|| format!("copying {} to {}", from.display(), path.display()))?;
        Ok(())
    }

    /// Gives every staged file its name, or none of them.
    pub fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let created = std::mem::take(&mut self.created);
        let mut done: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
        let mut failure = None;
        for (tmp, path) in staged {
            if let Err(e) = give_name(tmp, &path, &mut done) {
                failure = Some(e);
                break;
            }
        }
        // The temporaries not renamed went with the loop: the directories can go too.
        if let Some(e) = failure {
            let removed = undo(&done, &created);
            if removed.is_empty() {
                return Err(e);
            }
            bail!("{e:#} (removed what this run had written: {})", removed.join(", "));
        }
        for (_, old) in done {
            if let Some(old) = old {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    }
}

/// A set dropped before its commit (an error or an interrupt while staging) leaves nothing: its
/// temporary files go with it, and so do the directories it created.
impl Drop for OutputSet {
    fn drop(&mut self) {
        self.staged.clear();
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Renames `tmp` to `path` (moving a file already there aside first), recording it in `done`.
fn give_name(tmp: NamedTempFile, path: &Path, done: &mut Vec<(PathBuf, Option<PathBuf>)>) -> Result<()> {
    pause_before(path);
    check_interrupt()?;
    tmp.as_file().sync_all().with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(tmp.path(), Permissions::from_mode(0o644))?;
    let old = if path.exists() {
        let aside =
            temp_beside(path)?.into_temp_path().keep().context("reserving a name for the old file")?;
        std::fs::rename(path, &aside).with_context(|| format!("moving the old {} aside", path.display()))?;
        Some(aside)
    } else {
        None
    };
    match tmp.persist(path) {
        Ok(_) => {
            done.push((path.to_path_buf(), old));
            Ok(())
        }
        Err(e) => {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, path);
            }
            Err(e).with_context(|| format!("cannot write {}", path.display()))
        }
    }
}

/// Removes the files `done` renamed (putting back what each replaced) and the empty directories
/// `created`; returns the paths removed.
fn undo(done: &[(PathBuf, Option<PathBuf>)], created: &[PathBuf]) -> Vec<String> {
    let mut removed = Vec::new();
    for (path, old) in done.iter().rev() {
        let gone = match old {
            Some(old) => std::fs::rename(old, path).is_ok(),
            None => std::fs::remove_file(path).is_ok(),
        };
        if gone {
            removed.push(path.display().to_string());
        }
    }
    for dir in created.iter().rev() {
        if std::fs::remove_dir(dir).is_ok() {
            removed.push(format!("{}/", dir.display()));
        }
    }
    removed
}

/// The test hook of [`PAUSE_BEFORE`].
fn pause_before(path: &Path) {
    let Some(name) = std::env::var_os(PAUSE_BEFORE) else { return };
    if path.file_name() != Some(name.as_os_str()) {
        return;
    }
    let marker = path.with_file_name(format!("{}.paused", name.to_string_lossy()));
    let _ = std::fs::write(&marker, b"");
    for _ in 0..600 {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(marker);
}
