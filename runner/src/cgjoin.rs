//! `atropos-runner --join DIR [--join DIR...] (--slot-net ... | -- COMMAND...)`: this process moves
//! itself into the slot's control groups (what it starts inherits them), then links the slot's
//! network in the same process or execs COMMAND (bubblewrap). The twin of the `sh -c 'echo $$ >
//! DIR/cgroup.procs && exec "$@"'` wrapper of atropos.sandbox.server.cgroups, which the Python
//! runner's servers use: a shell's start cost every slot's start ~1.3 ms here.

use std::io;

use crate::sys;

pub const FLAG: &str = "--join";

/// The groups named by the leading `--join DIR` pairs joined; the arguments after them.
pub fn join(mut args: &[String]) -> Result<&[String], String> {
    let pid = std::process::id().to_string();
    while args.first().map(String::as_str) == Some(FLAG) {
        let dir = args
            .get(1)
            .ok_or_else(|| format!("atropos-runner: {FLAG} needs a control group's directory"))?;
        std::fs::write(format!("{dir}/cgroup.procs"), &pid)
            .map_err(|e| format!("atropos-runner: joining the slot's group {dir}: {e}"))?;
        args = &args[2..];
    }
    Ok(args)
}

/// exec `command` (searched in PATH); returns only on failure, with why.
pub fn exec(command: &[String]) -> String {
    let Some(program) = command.first() else {
        return "atropos-runner: no command to run".into();
    };
    let argv = match sys::Argv::new(command) {
        Ok(argv) => argv,
        Err(e) => return format!("atropos-runner: cannot run {program}: {e}"),
    };
    // SAFETY: a NULL-terminated array of NUL-terminated strings that outlive the call
    unsafe { libc::execvp(argv.program(), argv.as_ptr()) };
    format!("atropos-runner: cannot run {program}: {}", io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn joins_every_group_named_then_hands_back_the_rest() {
        let dirs: Vec<_> = (0..2)
            .map(|i| std::env::temp_dir().join(format!("atropos-cgjoin-{}-{i}", std::process::id())))
            .collect();
        for dir in &dirs {
            std::fs::create_dir_all(dir).unwrap();
        }
        let line = format!("--join {} --join {} -- bwrap x", dirs[0].display(), dirs[1].display());
        let given = args(&line);
        assert_eq!(join(&given).unwrap(), &args("-- bwrap x")[..]);
        for dir in &dirs {
            let written = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            assert_eq!(written, std::process::id().to_string());
            std::fs::remove_dir_all(dir).unwrap();
        }
        assert!(join(&args("--join")).unwrap_err().contains("needs a control group"));
        let missing = join(&args("--join /nonexistent/atropos -- x")).unwrap_err();
        assert!(missing.contains("/nonexistent/atropos"), "{missing}");
    }
}
