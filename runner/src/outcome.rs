//! What one tool call came to (the fields of the HTTP API's `ExecuteResult`), and the only
//! places that change one after its command ran (the twin of atropos.sandbox.runner.protocol).

use serde_json::{json, Map, Value};
use std::time::Instant;

use crate::capture::BoundedBuffer;

pub type Outcome = Map<String, Value>;

pub fn elapsed_ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

/// What an agent reads: stdout, then stderr on a line of its own.
fn combine_output(stdout: &str, stderr: &str) -> String {
    if stdout.is_empty() || stderr.is_empty() {
        return format!("{stdout}{stderr}");
    }
    let sep = if stdout.ends_with('\n') { "" } else { "\n" };
    format!("{stdout}{sep}{stderr}")
}

pub fn outcome_of(
    out: &BoundedBuffer,
    err: &BoundedBuffer,
    exit_code: Option<i32>,
    timed_out: bool,
    started: Instant,
    error: Option<String>,
) -> Outcome {
    let (stdout, stderr) = (out.text(), err.text());
    let error = match error {
        None if timed_out => Some("command timed out; its processes were killed".to_string()),
        other => other,
    };
    let value = json!({
        "ok": exit_code == Some(0) && !timed_out && error.is_none(),
        "output": combine_output(&stdout, &stderr),
        "stdout": stdout,
        "stderr": stderr,
        "exit_code": exit_code,
        "timed_out": timed_out,
        "truncated": out.truncated() || err.truncated(),
        "duration_ms": elapsed_ms(started),
        "error": error,
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn text_of<'a>(outcome: &'a Outcome, key: &str) -> &'a str {
    outcome.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A line from the sandbox itself (not the command) at the end of what the agent reads.
pub fn add_note(outcome: &mut Outcome, text: &str) {
    let line = format!("[sandbox] {text}\n");
    let output = text_of(outcome, "output");
    let sep = if !output.is_empty() && !output.ends_with('\n') {
        "\n"
    } else {
        ""
    };
    let output = format!("{output}{sep}{line}");
    let stderr = format!("{}{line}", text_of(outcome, "stderr"));
    outcome.insert("output".into(), output.into());
    outcome.insert("stderr".into(), stderr.into());
}

/// `text` first in the outcome's error, before what the command's own failure said.
pub fn prepend_error(outcome: &mut Outcome, text: &str) {
    let error = match text_of(outcome, "error") {
        "" => text.to_string(),
        earlier => format!("{text}; {earlier}"),
    };
    outcome.insert("error".into(), error.into());
}

/// The command was stopped by a limit: it failed, and says which limit in words an agent can act on.
pub fn stopped_by(outcome: &mut Outcome, kind: &str, description: &str) {
    outcome.insert("limit".into(), kind.into());
    outcome.insert("ok".into(), false.into());
    prepend_error(outcome, &format!("stopped: {description}"));
}

/// A refusal or a failure before any command ran.
pub fn failed(started: Instant, error: &str) -> Outcome {
    let mut outcome = Outcome::new();
    outcome.insert("ok".into(), false.into());
    outcome.insert("error".into(), error.into());
    outcome.insert("duration_ms".into(), elapsed_ms(started).into());
    outcome
}

/// Shell quoting as Python's shlex.quote does it.
pub fn shell_quote(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if text.is_empty() {
        "''".to_string()
    } else if text.chars().all(safe) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\"'\"'"))
    }
}

/// `command` run in `cwd` (relative: to the workspace `root`) with `env` added, as shell text.
/// `scoped`: in a subshell, so that a session's own directory and variables stay as they were.
/// A `cwd` that cannot be entered fails the command (bash's message, exit status 1).
pub fn placed_command(command: &str, cwd: Option<&str>, env: &[(String, String)], root: &str, scoped: bool) -> String {
    if cwd.is_none() && env.is_empty() {
        return command.to_string();
    }
    let mut lines = Vec::new();
    if let Some(cwd) = cwd {
        let dir = if cwd.starts_with('/') {
            cwd.to_string()
        } else if root.ends_with('/') {
            format!("{root}{cwd}")
        } else {
            format!("{root}/{cwd}")
        };
        lines.push(format!("cd -- {} || exit", shell_quote(&dir)));
    }
    for (name, value) in env {
        lines.push(format!("export {name}={}", shell_quote(value)));
    }
    lines.push(command.to_string());
    let body = lines.join("\n");
    if scoped {
        format!("(\n{body}\n)")
    } else {
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_shlex() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\"'\"'s'");
        assert_eq!(shell_quote("/x/y-z_1"), "/x/y-z_1");
        assert_eq!(shell_quote(""), "''");
    }
}
