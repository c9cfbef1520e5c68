//! A migration's events (its arrival at `receive`, a postcopy pause and
//! its recovery) for the operator: one line on stderr each, also with
//! `--quiet` (a paused migration is what an operator must hear about),
//! and with `--json` one `{"event": ...}` object per event on stdout,
//! before the summary.

use std::io::Write;

use livemig_kvm::MigrationEvent;
use serde_json::{Value, json};

/// What [`EventLog::arrived`] prints on stderr, before the peer's address.
pub const ARRIVED_LINE: &str = "a migration arrived from";

/// Where a migration's events go.
#[derive(Debug, Clone, Copy)]
pub struct EventLog {
    json: bool,
}

impl EventLog {
    /// Events on stderr, and as JSON lines on stdout when `json`.
    pub fn new(json: bool) -> Self {
        EventLog { json }
    }

    /// Tells the operator that a migration arrived from `peer` (a
    /// `migration-arrived` event in JSON): `receive` says it once its
    /// Ctrl-C and SIGTERM handlers are in place, so a script may interrupt
    /// the migration from then on.
    pub fn arrived(&self, peer: &str) {
        eprintln!("livemig: {ARRIVED_LINE} {peer}");
        if self.json {
            println!("{}", json!({ "event": "migration-arrived", "peer": peer }));
            let _ = std::io::stdout().flush();
        }
    }

    /// Tells the operator about `event`.
    pub fn say(&self, event: &MigrationEvent) {
        eprintln!("livemig: {event}");
        if self.json {
            println!("{}", event_json(event));
            // A script follows the events as they come.
            let _ = std::io::stdout().flush();
        }
    }
}

/// `event` as one JSON object: `"event"` names it, the rest are its fields
/// in the summary's kebab-case.
pub fn event_json(event: &MigrationEvent) -> Value {
    let mut v = match event {
        MigrationEvent::PostcopyPaused { reason } => json!({ "reason": reason }),
        MigrationEvent::AwaitingRecovery {
            address,
            seconds_left,
            last_error,
        } => json!({
            "address": address,
            "seconds-left": seconds_left,
            "last-error": last_error,
        }),
        MigrationEvent::RecoveryStarted { peer } => json!({ "peer": peer }),
        MigrationEvent::PreemptNotReopened { reason } => json!({ "reason": reason }),
        MigrationEvent::Recovered { recoveries } => json!({ "postcopy-recoveries": recoveries }),
        MigrationEvent::RecoveryAbandoned { reason, pages } => {
            json!({ "reason": reason, "pages": pages })
        }
    };
    v["event"] = json!(event.name());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_named_objects() {
        let v = event_json(&MigrationEvent::Recovered { recoveries: 2 });
        assert_eq!(v["event"], "recovered");
        assert_eq!(v["postcopy-recoveries"], 2);
        let v = event_json(&MigrationEvent::PostcopyPaused {
            reason: "connection lost".into(),
        });
        assert_eq!(v["event"], "postcopy-paused");
        assert_eq!(v["reason"], "connection lost");
        let e = MigrationEvent::PreemptNotReopened {
            reason: "connection refused".into(),
        };
        let v = event_json(&e);
        assert_eq!(v["event"], "preempt-not-reopened");
        assert_eq!(v["reason"], "connection refused");
        assert!(e.to_string().contains("main stream"), "{e}");
    }
}
