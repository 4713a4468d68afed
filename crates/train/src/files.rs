//! Writing outputs without losing what was there. A file is replaced atomically (a temporary
//! file in its directory, fsync, rename), through a symlink to the file the link names, and never
//! in place of something that is not a regular file (a device, a fifo, a directory). A directory
//! a command fills ([`NewFiles`]) loses again what the command added if the command fails, so a
//! retry finds it as it was.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::TrainError;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
/// A symlink at `path` stays and the file it names is replaced, keeping that file's permissions;
/// anything else that is not a regular file is refused, not replaced. On an error nothing is
/// left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let path = &replaceable_target(path)?;
    // The file replaced keeps its mode (a private file stays private), as editors do.
    let mode = std::fs::metadata(path).ok().map(|m| m.permissions());
    let dir = path.parent().unwrap_or(Path::new(""));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    // A name no other write of this process takes (threads may write at once), and a file made
    // anew: whatever already has that name (a link, a directory) is neither followed nor, on the
    // error path, removed.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp_path = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    // Errors name the file asked for: the temporary is gone by the time the user reads them.
    let io = |e| TrainError::io(path, e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(io)?;
    let tmp = TempPath::new(tmp_path);
    if let Some(mode) = mode {
        f.set_permissions(mode).map_err(io)?;
    }
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp.path, path).map_err(io)?;
    tmp.keep();
    sync_dir(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    });
    Ok(())
}

/// The file that writing `path` replaces: `path` itself, or what its symlinks lead to. It may
/// not exist yet; when it does, it must be a regular file.
fn replaceable_target(path: &Path) -> Result<PathBuf, TrainError> {
    let mut p = path.to_path_buf();
    // As the kernel's own limit on a chain of links.
    for _ in 0..40 {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(TrainError::io(&p, e)),
        };
        let kind = meta.file_type();
        if kind.is_file() {
            return Ok(p);
        }
        if !kind.is_symlink() {
            return Err(TrainError::NotRegularFile {
                path: path.display().to_string(),
                kind: describe(&kind),
            });
        }
        let link = std::fs::read_link(&p).map_err(|e| TrainError::io(&p, e))?;
        p = match p.parent() {
            Some(dir) if link.is_relative() => dir.join(link),
            _ => link,
        };
    }
    Err(TrainError::io(
        path,
        std::io::Error::other("too many levels of symbolic links"),
    ))
}

fn describe(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_fifo() {
            return "a fifo";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// Whether `name` (read from a file: `latest`, meta.json) names an entry of its directory
/// itself, not a path out of it or into a subdirectory.
pub(crate) fn stays_in_dir(name: &str) -> bool {
    !name.contains('/') && !name.contains("..")
}

pub(crate) fn sync_dir(dir: &Path) {
    // Makes a rename durable; not every platform lets a directory be opened, hence best effort.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A temporary file or directory, removed when dropped unless [`keep`](TempPath::keep) was
/// called: what an error path (a full disk) would otherwise leave behind, to pile up on retries.
pub(crate) struct TempPath {
    pub path: PathBuf,
    armed: bool,
}

impl TempPath {
    pub fn new(path: PathBuf) -> Self {
        TempPath { path, armed: true }
    }

    /// The temporary was renamed into place (or is wanted): nothing to remove.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.is_dir() => drop(std::fs::remove_dir_all(&self.path)),
            Ok(_) => drop(std::fs::remove_file(&self.path)),
            Err(_) => {}
        }
    }
}

/// The files a command adds to an output directory (`tessera export`, `data prepare`). Dropped
/// before [`finish`](NewFiles::finish), after a failure, it removes them and the directories it
/// created, so that a retry is not refused for what the failed run left; what was there before
/// is never removed (a file the run overwrote is not restored: the commands give it a fresh or
/// empty directory). A file written through a dangling link is not counted as added.
pub struct NewFiles {
    /// Directories this run created, the deepest first.
    created_dirs: Vec<PathBuf>,
    /// Files this run added (none of them existed before).
    added: Vec<PathBuf>,
    done: bool,
}

impl NewFiles {
    /// Creates `dir` and the directories above it that are missing.
    pub fn create(dir: &Path) -> Result<Self, TrainError> {
        let created_dirs: Vec<PathBuf> = dir
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .take_while(|a| std::fs::symlink_metadata(a).is_err())
            .map(Path::to_path_buf)
            .collect();
        // Dropped on an error: removes what create_dir_all made before it failed.
        let files = NewFiles {
            created_dirs,
            added: vec![],
            done: false,
        };
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        Ok(files)
    }

    /// Writes `path` (in the directory) atomically, remembered for removal if it is new.
    pub fn write(&mut self, path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
        if std::fs::symlink_metadata(path).is_err() {
            self.added.push(path.to_path_buf());
        }
        write_atomic(path, bytes)
    }

    /// The command succeeded: its files stay.
    pub fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for NewFiles {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for f in self.added.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        // remove_dir removes only an empty directory: what another process put there stays.
        for d in &self.created_dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_is_written_through_and_stays_a_link() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("sub/real.svg");
        std::fs::create_dir(t.path().join("sub")).unwrap();
        std::fs::write(&real, "old").unwrap();
        let link = t.path().join("link.svg");
        std::os::unix::fs::symlink("sub/real.svg", &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        // A link to a file not there yet makes it.
        let dangling = t.path().join("dangling.svg");
        std::os::unix::fs::symlink("sub/made.svg", &dangling).unwrap();
        write_atomic(&dangling, b"made").unwrap();
        assert_eq!(
            std::fs::read(t.path().join("sub/made.svg")).unwrap(),
            b"made"
        );
        assert_eq!(entries(t.path()), ["dangling.svg", "link.svg", "sub"]);
        assert_eq!(entries(&t.path().join("sub")), ["made.svg", "real.svg"]);
    }

    #[cfg(unix)]
    #[test]
    fn what_is_not_a_regular_file_is_refused_not_replaced() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let dir = t.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        let to_dir = t.path().join("to_dir");
        std::os::unix::fs::symlink("dir", &to_dir).unwrap();
        for (p, kind) in [
            (&fifo, "a fifo"),
            (&dir, "a directory"),
            (&to_dir, "a directory"),
        ] {
            let e = write_atomic(p, b"x").unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "{} is {kind}, not a regular file; not replacing it",
                    p.display()
                )
            );
        }
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        // Nothing left behind: no temporary file beside them.
        assert_eq!(entries(t.path()), ["dir", "fifo", "to_dir"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_replaced_file_keeps_its_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("curve.csv");
        std::fs::write(&file, "old").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&file, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the replaced file's mode");
        // Through a link, the file it names keeps its own mode.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("link.csv");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        write_atomic(&link, b"newer").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "newer");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "the linked file's mode");
        assert_eq!(entries(dir.path()), ["curve.csv", "link.csv"]);
    }

    #[test]
    fn a_temporary_goes_unless_kept() {
        let t = tempfile::tempdir().unwrap();
        let file = TempPath::new(t.path().join(".x.tmp-1"));
        std::fs::write(&file.path, "half").unwrap();
        drop(file);
        let dir = TempPath::new(t.path().join(".step.tmp-1"));
        std::fs::create_dir_all(dir.path.join("sub")).unwrap();
        std::fs::write(dir.path.join("sub/state"), "half").unwrap();
        drop(dir);
        let kept = TempPath::new(t.path().join("kept"));
        std::fs::write(&kept.path, "whole").unwrap();
        kept.keep();
        assert_eq!(entries(t.path()), ["kept"]);
    }

    #[test]
    fn a_failed_command_takes_back_only_what_it_added() {
        let t = tempfile::tempdir().unwrap();
        // A new directory (and the missing one above it) goes again.
        let out = t.path().join("a/b");
        let mut files = NewFiles::create(&out).unwrap();
        files.write(&out.join("model.safetensors"), b"w").unwrap();
        assert!(files.write(&out.join("no/config.json"), b"c").is_err());
        drop(files);
        assert_eq!(entries(t.path()), Vec::<String>::new());
        // An existing directory stays, and so does what it held.
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("keep.txt"), "mine").unwrap();
        let mut files = NewFiles::create(&out).unwrap();
        files.write(&out.join("new.bin"), b"n").unwrap();
        drop(files);
        assert_eq!(entries(&out), ["keep.txt"]);
        assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
        // A finished command keeps its files.
        let mut files = NewFiles::create(&out).unwrap();
        files.write(&out.join("meta.json"), b"{}").unwrap();
        files.finish();
        assert_eq!(entries(&out), ["keep.txt", "meta.json"]);
    }
}
