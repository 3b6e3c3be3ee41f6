//! A pseudo-terminal standing in for a serial register: the path the agent's config names
//! becomes a symlink to the pty's slave side, as udev links `/dev/serial/by-id/…`, and the
//! simulator writes to the master side as the register's line would. Unplugging closes the
//! pty and removes the link; plugging in makes a new one.
//!
//! Invariants: the slave is put in raw mode before the agent opens it (no echo, no CR/LF
//! translation); a link is only ever made where nothing exists or where our own link was, so
//! a real device is never shadowed.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One simulated serial line.
#[derive(Debug)]
pub struct PtyLine {
    path: PathBuf,
    master: Option<std::fs::File>,
    slave: Option<OwnedFd>,
}

impl PtyLine {
    /// Plugs a new line in at `path`.
    pub fn plug_in_at(path: &Path) -> std::io::Result<PtyLine> {
        let mut line = PtyLine {
            path: path.to_path_buf(),
            master: None,
            slave: None,
        };
        line.plug_in()?;
        Ok(line)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh pty linked at the path (the old link, if ours, is replaced).
    pub fn plug_in(&mut self) -> std::io::Result<()> {
        let io = |e: nix::Error| std::io::Error::from(e);
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| !m.file_type().is_symlink()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a link: a real device is there",
                    self.path.display()
                ),
            ));
        }
        let pty = nix::pty::openpty(None, None).map_err(io)?;
        let mut t = nix::sys::termios::tcgetattr(&pty.slave).map_err(io)?;
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t)
            .map_err(io)?;
        let name = nix::unistd::ttyname(&pty.slave).map_err(io)?;
        let _ = std::fs::remove_file(&self.path);
        std::os::unix::fs::symlink(name, &self.path)?;
        self.master = Some(std::fs::File::from(pty.master));
        self.slave = Some(pty.slave);
        Ok(())
    }

    /// Closes the pty and removes the link, as pulling the adapter would.
    pub fn unplug(&mut self) {
        self.master = None;
        self.slave = None;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Writes like a 9600-baud line: small pieces with gaps.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        for piece in bytes.chunks(96) {
            let m = self.master.as_mut().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotConnected, "the line is unplugged")
            })?;
            m.write_all(piece)?;
            m.flush()?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

impl Drop for PtyLine {
    fn drop(&mut self) {
        self.unplug();
    }
}
