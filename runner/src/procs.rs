//! Processes of the slot, read from /proc, and killing a tree without races (the twin of
//! atropos.host.procs): a tree may fork faster than we kill, so it is frozen (SIGSTOP) until no
//! new member appears, then killed.

use std::collections::{HashMap, HashSet};
use std::fs;

const FREEZE_ROUNDS: usize = 200;

#[derive(Clone, Copy)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
}

fn read_stat(pid: i32) -> Option<(ProcInfo, u8)> {
    let raw = fs::read(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may hold spaces and parentheses: the fields start after the last ')'
    let close = raw.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(raw.get(close + 2..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.as_bytes().first().copied()?;
    let mut num = || fields.next().and_then(|f| f.parse::<i32>().ok());
    let (ppid, pgid, sid) = (num()?, num()?, num()?);
    Some((ProcInfo { pid, ppid, pgid, sid }, state))
}

/// Every live process; zombies are left out (already dead, their parent reaps them).
pub fn snapshot() -> HashMap<i32, ProcInfo> {
    let mut procs = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((info, state)) = read_stat(pid) {
                if state != b'Z' {
                    procs.insert(pid, info);
                }
            }
        }
    }
    procs
}

/// Descendants of `root`, plus processes still in its session or process group (orphans that
/// were reparented away, `cmd &` whose parent exited); this process is never a member.
pub fn tree_members(root: i32, procs: &HashMap<i32, ProcInfo>, include_root: bool) -> HashSet<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for info in procs.values() {
        children.entry(info.ppid).or_default().push(info.pid);
    }
    let mut found = HashSet::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            if found.insert(child) {
                stack.push(child);
            }
        }
    }
    found.extend(
        procs
            .values()
            .filter(|p| p.sid == root || p.pgid == root)
            .map(|p| p.pid),
    );
    if include_root && procs.contains_key(&root) {
        found.insert(root);
    } else {
        found.remove(&root);
    }
    found.remove(&std::process::id().try_into().unwrap_or(-1));
    found
}

fn signal_all(pids: &HashSet<i32>, sig: i32) {
    for &pid in pids {
        // SAFETY: kill(2) with a pid and a signal number; failures (gone, not ours) are skipped
        unsafe { libc::kill(pid, sig) };
    }
}

/// Freeze then SIGKILL every member of `root`'s tree; how many were killed.
pub fn kill_tree(root: i32, include_root: bool) -> usize {
    let mut frozen: HashSet<i32> = HashSet::new();
    for _ in 0..FREEZE_ROUNDS {
        let procs = snapshot();
        let mut members = tree_members(root, &procs, include_root);
        for &pid in frozen.iter().filter(|p| procs.contains_key(p)) {
            members.extend(tree_members(pid, &procs, true));
        }
        let new: HashSet<i32> = members.difference(&frozen).copied().collect();
        if new.is_empty() {
            break;
        }
        signal_all(&new, libc::SIGSTOP);
        frozen.extend(new);
    }
    signal_all(&frozen, libc::SIGKILL);
    frozen.len()
}

pub fn own_pid() -> i32 {
    // SAFETY: getpid cannot fail
    unsafe { libc::getpid() }
}
