//! A container's `linux.seccomp` profile (the OCI runtime spec's, as Docker,
//! containerd's RuntimeDefault and Kubernetes' localhost profiles write it)
//! as classic BPF programs, compiled here with seccompiler and installed by
//! the guest agent in the container's processes just before their exec.
//!
//! seccompiler gives a filter one action for its matches, so a profile is
//! stacked as several filters, which the kernel all runs, taking the most
//! restrictive answer: one whose mismatches get the default action and whose
//! matches (every rule with another action) are allowed, and one per other
//! action that gives it to its rules' matches and allows the rest. A call no
//! rule matches gets the default action; one that matches gets its rule's.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Seccomp {
    pub default_action: String,
    pub default_errno_ret: Option<u32>,
    pub architectures: Vec<String>,
    pub flags: Vec<String>,
    pub listener_path: String,
    pub syscalls: Vec<Syscall>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Syscall {
    pub names: Vec<String>,
    pub action: String,
    pub errno_ret: Option<u32>,
    pub args: Vec<Arg>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Arg {
    pub index: u32,
    pub value: u64,
    pub value_two: u64,
    pub op: String,
}

/// Compiled: the programs (each `sock_filter` as 8 little-endian bytes) and
/// the `seccomp(2)` flags to install them with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub programs: Vec<Vec<u8>>,
    pub flags: u32,
}

/// An action, ordered as the kernel ranks them (most restrictive last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Allow,
    Log,
    Trace(u32),
    Errno(u32),
    Trap,
    KillThread,
    KillProcess,
}

impl Action {
    fn parse(name: &str, errno: Option<u32>) -> Result<Action, String> {
        const EPERM: u32 = 1;
        Ok(match name {
            "SCMP_ACT_ALLOW" => Action::Allow,
            "SCMP_ACT_LOG" => Action::Log,
            "SCMP_ACT_TRACE" => Action::Trace(errno.unwrap_or(EPERM)),
            "SCMP_ACT_ERRNO" => Action::Errno(errno.unwrap_or(EPERM)),
            "SCMP_ACT_TRAP" => Action::Trap,
            "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Action::KillThread,
            "SCMP_ACT_KILL_PROCESS" => Action::KillProcess,
            "SCMP_ACT_NOTIFY" => {
                return Err(
                    "seccomp action SCMP_ACT_NOTIFY is not supported: the container's \
                     processes are in a VM, out of reach of a listener on the host"
                        .into(),
                )
            }
            other => return Err(format!("unknown seccomp action {other:?}")),
        })
    }

    fn to_seccompiler(self) -> SeccompAction {
        match self {
            Action::Allow => SeccompAction::Allow,
            Action::Log => SeccompAction::Log,
            Action::Trace(n) => SeccompAction::Trace(n),
            Action::Errno(n) => SeccompAction::Errno(n),
            Action::Trap => SeccompAction::Trap,
            Action::KillThread => SeccompAction::KillThread,
            Action::KillProcess => SeccompAction::KillProcess,
        }
    }
}

fn operator(arg: &Arg) -> Result<(SeccompCmpOp, u64), String> {
    Ok(match arg.op.as_str() {
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, arg.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, arg.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, arg.value),
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, arg.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, arg.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, arg.value),
        // libseccomp's: (arg & value) == valueTwo.
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(arg.value), arg.value_two),
        other => return Err(format!("unknown seccomp operator {other:?}")),
    })
}

fn flag(name: &str) -> Result<u32, String> {
    Ok(match name {
        "SECCOMP_FILTER_FLAG_TSYNC" => 1,
        "SECCOMP_FILTER_FLAG_LOG" => 2,
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => 4,
        other => return Err(format!("unknown seccomp flag {other:?}")),
    })
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// One syscall entry's rule: its argument conditions, all of which must hold.
fn rule(entry: &Syscall) -> Result<Option<SeccompRule>, String> {
    if entry.args.is_empty() {
        return Ok(None);
    }
    let mut conditions = Vec::new();
    for a in &entry.args {
        let index = u8::try_from(a.index)
            .ok()
            .filter(|i| *i < 6)
            .ok_or_else(|| {
                format!(
                    "seccomp argument index {} is out of range (0 to 5)",
                    a.index
                )
            })?;
        let (op, value) = operator(a)?;
        conditions.push(
            SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
                .map_err(|e| format!("seccomp condition: {e}"))?,
        );
    }
    SeccompRule::new(conditions)
        .map(Some)
        .map_err(|e| format!("seccomp rule: {e}"))
}

/// Compiles `profile`, or says why it cannot be applied.
pub fn compile(profile: &Seccomp) -> Result<Compiled, String> {
    if !profile.listener_path.is_empty() {
        return Err("seccomp listenerPath is not supported: the container is in a VM".into());
    }
    let default = Action::parse(&profile.default_action, profile.default_errno_ret)?;
    let mut flags = 0;
    for f in &profile.flags {
        flags |= flag(f)?;
    }
    // The calls some rule gives another action than the default, and per
    // action the rules that give it.
    let mut listed = Rules::new();
    let mut unconditional_listed = std::collections::BTreeSet::new();
    let mut by_action: BTreeMap<Action, (Rules, std::collections::BTreeSet<i64>)> = BTreeMap::new();
    for entry in &profile.syscalls {
        let action = Action::parse(&entry.action, entry.errno_ret)?;
        if action == default {
            continue;
        }
        add_tracked(&mut listed, &mut unconditional_listed, entry)?;
        if action != Action::Allow {
            let (rules, unconditional) = by_action.entry(action).or_default();
            add_tracked(rules, unconditional, entry)?;
        }
    }
    let build = |rules: Rules, mismatch: Action, matched: Action| -> Result<Vec<u8>, String> {
        let filter = SeccompFilter::new(
            rules,
            mismatch.to_seccompiler(),
            matched.to_seccompiler(),
            TargetArch::x86_64,
        )
        .map_err(|e| format!("seccomp: {e}"))?;
        let program: seccompiler::BpfProgram =
            filter.try_into().map_err(|e| format!("seccomp: {e}"))?;
        let mut bytes = Vec::with_capacity(program.len() * 8);
        for i in program {
            bytes.extend_from_slice(&i.code.to_le_bytes());
            bytes.push(i.jt);
            bytes.push(i.jf);
            bytes.extend_from_slice(&i.k.to_le_bytes());
        }
        Ok(bytes)
    };
    let mut programs = Vec::new();
    if default != Action::Allow {
        programs.push(build(listed, default, Action::Allow)?);
    }
    for (action, (rules, _)) in by_action {
        programs.push(build(rules, Action::Allow, action)?);
    }
    Ok(Compiled { programs, flags })
}

/// Adds `entry`'s names (those x86_64 has; others are skipped, as runc's
/// libseccomp does) to `rules`. A call listed without conditions matches
/// whatever its arguments: seccompiler's empty rule list; `unconditional`
/// keeps later conditional entries from narrowing it.
fn add_tracked(
    rules: &mut Rules,
    unconditional: &mut std::collections::BTreeSet<i64>,
    entry: &Syscall,
) -> Result<(), String> {
    let r = rule(entry)?;
    for name in &entry.names {
        let Ok(nr) = syscalls::Sysno::from_str(name) else {
            tracing::debug!(syscall = %name, "seccomp: no such system call on x86_64, skipped");
            continue;
        };
        let nr = nr.id() as i64;
        if unconditional.contains(&nr) {
            continue;
        }
        match &r {
            None => {
                unconditional.insert(nr);
                rules.insert(nr, Vec::new());
            }
            Some(r) => rules.entry(nr).or_default().push(r.clone()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> Seccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn profiles_compile_into_stacked_programs() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,"syscalls":[
                {"names":["read","write","no_such_call"],"action":"SCMP_ACT_ALLOW"},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                 "args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                {"names":["sethostname"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                {"names":["clone"],"action":"SCMP_ACT_ALLOW",
                 "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        );
        let c = compile(&p).unwrap();
        assert_eq!(c.programs.len(), 2, "the default's and EPERM's");
        assert!(c.programs.iter().all(|p| !p.is_empty() && p.len() % 8 == 0));
        let allow_all = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["sethostname"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&allow_all).unwrap().programs.len(), 1);
    }

    #[test]
    fn what_a_vm_cannot_do_is_refused() {
        for bad in [
            r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/l.sock"}"#,
            r#"{"defaultAction":"SCMP_ACT_NOPE"}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_X"]}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],
                "action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],
                "action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":0,"op":"SCMP_CMP_SOME"}]}]}"#,
        ] {
            assert!(compile(&profile(bad)).is_err(), "{bad}");
        }
    }
}
