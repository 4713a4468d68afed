//! What the command-line tests share: a `tessera` whose files are capped in size, so that a
//! write fails part way as on a full disk, without mounting one.

#![allow(dead_code)]

use std::process::Command;

/// Caps every file `cmd` writes at `max_bytes` (RLIMIT_FSIZE, its signal SIGXFSZ ignored, which
/// the child inherits): a write past the cap fails with EFBIG ("File too large") where one on a
/// full disk fails with ENOSPC, after writing what fits.
#[cfg(unix)]
pub fn cap_file_size(cmd: &mut Command, max_bytes: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit) are made.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let cap = libc::rlimit {
                rlim_cur: max_bytes as libc::rlim_t,
                rlim_max: max_bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &cap) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The names in `dir`, sorted.
pub fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Makes a fifo at `path` (`mkfifo`).
pub fn mkfifo(path: &std::path::Path) {
    let made = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

/// Runs `cmd` with its standard output a pipe whose reader has gone (`tessera ... | head -1`
/// once `head` has exited): the read end is closed before the command writes.
pub fn with_stdout_closed(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}
