//! The built agent as a child process: what systemd runs, and what chaos kills.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::binary;

pub struct AgentProcess {
    pub child: Child,
}

impl AgentProcess {
    pub fn spawn(config: &Path) -> AgentProcess {
        Self::spawn_logging(config, Stdio::inherit())
    }

    /// Like [`AgentProcess::spawn`], with the agent's log (stderr) going to `log`.
    pub fn spawn_logging(config: &Path, log: impl Into<Stdio>) -> AgentProcess {
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,rumqttd=off")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        AgentProcess { child }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// The exit status if the process has ended on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("storelink.toml");
    std::fs::write(&path, text).unwrap();
    path
}
