//! Output paths checked before any work: a run that would overwrite what an earlier run left
//! (a model directory, a dataset, checkpoints) is refused, and one that could not write its
//! output at the end is stopped at the start, not after it has trained.

use std::path::Path;

use anyhow::{bail, Result};

/// `path` (given as `flag`) may take a new directory of output: it does not exist, or is an
/// empty directory.
pub fn fresh_dir(path: &Path, flag: &str) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if !path.is_dir() {
        bail!("{flag} {} exists and is not a directory", path.display());
    }
    let mut entries = std::fs::read_dir(path)
        .map_err(|e| anyhow::anyhow!("cannot read {flag} {}: {e}", path.display()))?;
    if entries.next().is_some() {
        bail!(
            "{flag} {} already exists and is not empty; give a new directory (nothing was written)",
            path.display()
        );
    }
    Ok(())
}

/// A file the run writes at its end (`flag`): its directory must exist, and it must not be a
/// directory itself, nor a device, fifo or socket (which the atomic write would refuse only at
/// the end, after training).
pub fn writable_file(path: &Path, flag: &str) -> Result<()> {
    if path.is_dir() {
        bail!("{flag} {} is a directory", path.display());
    }
    // Through symlinks: a link to a regular file is written through.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        bail!(
            "{flag} {} is not a regular file (a device, fifo or socket); give a file to write",
            path.display()
        );
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        if dir.exists() && !dir.is_dir() {
            bail!(
                "{flag} {}: {} is not a directory",
                path.display(),
                dir.display()
            );
        }
        if !dir.is_dir() {
            bail!(
                "{flag} {}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// A checkpoint root to save into (`--save`): not a file, and not holding another run's
/// checkpoints (a `latest` file or step directories) unless the run resumes from that root
/// (`resumes_from`: the root or step directory given to `--resume`), whose saves continue it.
pub fn checkpoint_root(root: &Path, resumes_from: Option<&Path>) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    if !root.is_dir() {
        bail!("--save {} exists and is not a directory", root.display());
    }
    let entries = std::fs::read_dir(root)
        .map_err(|e| anyhow::anyhow!("cannot read --save {}: {e}", root.display()))?;
    let holds = entries.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name == "latest" || name.starts_with("step_")
    });
    if !holds {
        return Ok(());
    }
    let same = |p: &Path| {
        let Ok(b) = root.canonicalize() else {
            return false;
        };
        match p.canonicalize() {
            Ok(a) => a == b || a.parent() == Some(b.as_path()),
            // A step directory that is not there (one a killed save of it again left moved
            // aside, which --resume reads): the root it names.
            Err(_) => p
                .parent()
                .map(|d| {
                    if d.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        d
                    }
                })
                .and_then(|d| d.canonicalize().ok())
                .is_some_and(|d| d == b),
        }
    };
    if resumes_from.is_some_and(same) {
        return Ok(());
    }
    bail!(
        "--save {} already holds checkpoints of another run; continue it with --resume {}, or save elsewhere (nothing was written)",
        root.display(),
        root.display()
    )
}

/// A checkpoint root held by one run for its life: a second run saving into it at the same time
/// (whose saves would replace the first's steps) is refused. Dropped at the run's end; a root this
/// made and nothing was saved into is removed again.
pub struct RootLock {
    _file: std::fs::File,
    root: std::path::PathBuf,
    made_root: bool,
}

/// The name of the lock file in a checkpoint root.
pub const ROOT_LOCK: &str = ".tessera-lock";

/// Takes `root`'s lock (`--save`), making the directory where it is missing; `None` where `root`
/// is not a directory (refused by [`checkpoint_root`]).
pub fn lock_root(root: &Path) -> Result<Option<RootLock>> {
    if root.exists() && !root.is_dir() {
        return Ok(None);
    }
    let made_root = !root.exists();
    std::fs::create_dir_all(root)
        .map_err(|e| anyhow::anyhow!("cannot make --save {}: {e}", root.display()))?;
    let path = root.join(ROOT_LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "--save {} is in use by another run saving into it now; save elsewhere (nothing was written)",
            root.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            bail!("cannot lock {}: {e}", path.display())
        }
    }
    Ok(Some(RootLock {
        _file: file,
        root: root.to_path_buf(),
        made_root,
    }))
}

impl Drop for RootLock {
    fn drop(&mut self) {
        // A root this run made and never saved into (a refused or failed start): gone again.
        if self.made_root {
            let only_lock = std::fs::read_dir(&self.root)
                .is_ok_and(|d| d.flatten().all(|e| e.file_name() == ROOT_LOCK));
            if only_lock {
                let _ = std::fs::remove_file(self.root.join(ROOT_LOCK));
                let _ = std::fs::remove_dir(&self.root);
            }
        }
    }
}

/// A run resumed from step `from` and saving into `root`: `root` holds no published step past
/// `from` (up to the one `latest` names), which this run's saves would replace (a run resumed from
/// an earlier step, say to lower the learning rate after a divergence, would otherwise overwrite
/// the later steps of the run it left). A step past `latest` was never published: a save killed
/// between renaming its directory in and writing `latest` left it, and the resumed run saves it
/// again.
pub fn no_later_steps(root: &Path, from: u64) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    let step_of = |name: &str| name.trim().strip_prefix("step_")?.parse::<u64>().ok();
    let mut later: Vec<u64> = entries
        .flatten()
        .filter_map(|e| step_of(e.file_name().to_str()?))
        .filter(|&s| s > from)
        .collect();
    later.sort_unstable();
    // One step past `latest` is what a killed save leaves (its directory renamed in, `latest` not
    // yet written): the resumed run saves it again. Two or more, or no readable `latest`, are not.
    let latest = std::fs::read_to_string(root.join("latest"))
        .ok()
        .and_then(|l| step_of(&l));
    if let Some(latest) = latest {
        let past: Vec<u64> = later.iter().copied().filter(|&s| s > latest).collect();
        if past.len() == 1 {
            later.retain(|&s| s != past[0]);
        }
    }
    if let Some(first) = later.first() {
        bail!(
            "--save {} holds step {first}{} past the step resumed from ({from}), which this run's saves would replace; save it elsewhere (nothing was written)",
            root.display(),
            match later.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_directories_must_be_new_or_empty() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("new");
        fresh_dir(&d, "--out").unwrap();
        std::fs::create_dir(&d).unwrap();
        fresh_dir(&d, "--out").unwrap();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        let e = fresh_dir(&d, "--out").unwrap_err().to_string();
        assert!(e.contains("already exists and is not empty"), "{e}");
        let f = d.join("config.json");
        let e = fresh_dir(&f, "--out").unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
    }

    #[test]
    fn files_written_at_the_end_need_their_directory_now() {
        let t = tempfile::tempdir().unwrap();
        writable_file(&t.path().join("c.svg"), "--curve").unwrap();
        writable_file(Path::new("c.svg"), "--curve").unwrap();
        let e = writable_file(&t.path().join("no/c.svg"), "--curve").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = writable_file(t.path(), "--curve").unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let e = writable_file(Path::new("/dev/null"), "--curve").unwrap_err();
        assert!(e.to_string().contains("is not a regular file"), "{e}");
    }

    #[test]
    fn a_checkpoint_root_of_another_run_is_refused_unless_resumed() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("ck");
        checkpoint_root(&root, None).unwrap();
        std::fs::create_dir_all(root.join("step_00000003")).unwrap();
        std::fs::write(root.join("latest"), "step_00000003").unwrap();
        let e = checkpoint_root(&root, None).unwrap_err().to_string();
        assert!(e.contains("already holds checkpoints"), "{e}");
        // Resuming from the root or from one of its step directories continues it.
        checkpoint_root(&root, Some(&root)).unwrap();
        checkpoint_root(&root, Some(&root.join("step_00000003"))).unwrap();
        // Also from a step directory not there under its name (a killed save of it again moved
        // it aside; resume reads it there), but not from one under another root.
        checkpoint_root(&root, Some(&root.join("step_00000002"))).unwrap();
        assert!(checkpoint_root(&root, Some(&t.path().join("x/step_00000002"))).is_err());
        // Resuming from another root does not.
        let other = t.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        assert!(checkpoint_root(&root, Some(&other)).is_err());
        // A file is refused; an empty directory or one of other files is taken.
        let f = t.path().join("afile");
        std::fs::write(&f, "x").unwrap();
        assert!(checkpoint_root(&f, None).is_err());
        checkpoint_root(&other, None).unwrap();
    }

    #[test]
    fn a_resumed_run_does_not_replace_later_steps() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        no_later_steps(&root.join("none"), 0).unwrap();
        for s in ["step_00000002", "step_00000004", "step_00000006", "step_x"] {
            std::fs::create_dir_all(root.join(s)).unwrap();
        }
        std::fs::write(root.join("latest"), "step_00000006").unwrap();
        no_later_steps(root, 6).unwrap();
        no_later_steps(root, 9).unwrap();
        let e = no_later_steps(root, 4).unwrap_err().to_string();
        assert!(
            e.contains("holds step 6 past the step resumed from (4)"),
            "{e}"
        );
        let e = no_later_steps(root, 2).unwrap_err().to_string();
        assert!(e.contains("holds step 4 and 1 more past"), "{e}");
        // One step past `latest`: a killed save's, saved again by the resumed run.
        std::fs::write(root.join("latest"), "step_00000004").unwrap();
        no_later_steps(root, 4).unwrap();
        assert!(no_later_steps(root, 2).is_err());
        // Two past it, or no readable `latest`: not a killed save's; refused.
        std::fs::write(root.join("latest"), "step_00000002").unwrap();
        assert!(no_later_steps(root, 2).is_err());
        for broken in ["", "garbage"] {
            std::fs::write(root.join("latest"), broken).unwrap();
            assert!(no_later_steps(root, 2).is_err(), "{broken:?}");
        }
        std::fs::remove_file(root.join("latest")).unwrap();
        assert!(no_later_steps(root, 2).is_err());
        no_later_steps(root, 6).unwrap();
    }

    #[test]
    fn a_root_is_saved_into_by_one_run_at_a_time() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("ck");
        let held = lock_root(&root).unwrap().unwrap();
        let e = lock_root(&root).err().unwrap().to_string();
        assert!(e.contains("is in use by another run"), "{e}");
        // Made by the lock and never saved into: removed with it.
        drop(held);
        assert!(!root.exists());
        std::fs::create_dir_all(root.join("step_00000001")).unwrap();
        drop(lock_root(&root).unwrap().unwrap());
        assert!(root.join("step_00000001").exists());
        let f = t.path().join("afile");
        std::fs::write(&f, "x").unwrap();
        assert!(lock_root(&f).unwrap().is_none());
    }
}
