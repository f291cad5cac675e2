//! Routing: which sinks get a notification of a transition.
//!
//! Routes are tried in order. A route matches when every condition it
//! gives holds (severity any-of, rule and device globs any-of, every label
//! equal, or present for `*`); its sinks are added, and the search stops
//! unless the route says `continue = true`. When no route matched, the
//! `default-sinks` get it. Pending transitions and resolves of alerts that
//! never fired go nowhere; a resolve skips sinks with `send-resolved =
//! false`. A sink named twice gets one notification.

use std::collections::{BTreeMap, HashSet};

use super::config::{AlertsConfig, RouteConfig};
use super::is_notified;
use crate::rules::eval::glob_match;
use crate::rules::model::{AlertState, Transition};

/// The routing table; see the module documentation.
#[derive(Debug, Clone)]
pub struct Routes {
    routes: Vec<RouteConfig>,
    default: Vec<String>,
    no_resolved: HashSet<String>,
}

fn labels_match(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| match have.get(k) {
        Some(h) => v == "*" || v == h,
        None => false,
    })
}

fn matches(r: &RouteConfig, t: &Transition) -> bool {
    (r.severity.is_empty() || r.severity.contains(&t.severity))
        && (r.rule.is_empty() || r.rule.iter().any(|g| glob_match(g, &t.rule)))
        && (r.device.is_empty() || r.device.iter().any(|g| glob_match(g, &t.device)))
        && labels_match(&r.labels, &t.labels)
}

impl Routes {
    /// The table of a validated config.
    pub fn new(cfg: &AlertsConfig) -> Routes {
        Routes {
            routes: cfg.route.clone(),
            default: cfg.default_sinks.clone(),
            no_resolved: cfg
                .sinks()
                .into_iter()
                .filter(|s| !s.delivery.send_resolved)
                .map(|s| s.name)
                .collect(),
        }
    }

    /// Sinks with `send-resolved = false`.
    pub fn no_resolved(&self) -> Vec<String> {
        let mut v: Vec<String> = self.no_resolved.iter().cloned().collect();
        v.sort();
        v
    }

    /// The sinks notified of `t`, in the order the routes name them.
    pub fn sinks_for(&self, t: &Transition) -> Vec<String> {
        if !is_notified(t) {
            return Vec::new();
        }
        let mut out: Vec<String> = Vec::new();
        let mut add = |names: &[String]| {
            for n in names {
                if !out.contains(n) {
                    out.push(n.clone());
                }
            }
        };
        let mut matched = false;
        for r in &self.routes {
            if matches(r, t) {
                matched = true;
                add(&r.sinks);
                if !r.continue_ {
                    break;
                }
            }
        }
        if !matched {
            add(&self.default);
        }
        if t.state == AlertState::Resolved {
            out.retain(|s| !self.no_resolved.contains(s));
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rules::model::Severity;

    fn cfg(text: &str) -> AlertsConfig {
        #[derive(serde::Deserialize)]
        struct W {
            alerts: AlertsConfig,
        }
        let w: W = toml::from_str(text).unwrap();
        let mut e = Vec::new();
        w.alerts.validate("alerts", &mut e);
        assert!(e.is_empty(), "{e:?}");
        w.alerts
    }

    fn t(rule: &str, device: &str, sev: Severity, state: AlertState, site: &str) -> Transition {
        Transition {
            fingerprint: "f".into(),
            number: 1,
            rule: rule.into(),
            device: device.into(),
            sensor: "temp".into(),
            severity: sev,
            state,
            labels: [("site".to_owned(), site.to_owned())].into(),
            summary: String::new(),
            value: None,
            threshold: None,
            event_time_ms: 0,
            processing_time_ms: 0,
            active_since_ms: Some(0),
        }
    }

    const TABLE: &str = r#"
        [alerts]
        default-sinks = ["log"]
        [[alerts.sink]]
        name = "pager"
        type = "webhook"
        url = "http://127.0.0.1:9/p"
        send-resolved = false
        [[alerts.sink]]
        name = "north"
        type = "webhook"
        url = "http://127.0.0.1:9/n"
        [[alerts.sink]]
        name = "all"
        type = "webhook"
        url = "http://127.0.0.1:9/a"
        [[alerts.route]]
        severity = ["critical"]
        sinks = ["pager"]
        continue = true
        [[alerts.route]]
        labels = { site = "north" }
        rule = ["boiler-*"]
        sinks = ["north", "pager"]
        [[alerts.route]]
        device = ["gw-?"]
        sinks = ["all"]
    "#;

    #[test]
    fn first_match_continue_and_default() {
        let r = Routes::new(&cfg(TABLE));
        use AlertState::*;
        use Severity::*;
        // critical: pager, continue -> north route matches too (pager once), stops.
        assert_eq!(
            r.sinks_for(&t("boiler-hot", "gw-1", Critical, Firing, "north")),
            vec!["pager", "north"]
        );
        // warning, south, gw-1: only the device route.
        assert_eq!(
            r.sinks_for(&t("boiler-hot", "gw-1", Warning, Firing, "south")),
            vec!["all"]
        );
        // nothing matches: default.
        assert_eq!(
            r.sinks_for(&t("x", "gw-10", Info, Firing, "south")),
            vec!["log"]
        );
        // the critical route alone (continue, nothing after matches) is a match: no default.
        assert_eq!(
            r.sinks_for(&t("x", "gw-10", Critical, Firing, "south")),
            vec!["pager"]
        );
    }

    #[test]
    fn resolves_skip_sinks_without_send_resolved_and_silent_resolves_go_nowhere() {
        let r = Routes::new(&cfg(TABLE));
        let mut res = t(
            "boiler-hot",
            "gw-1",
            Severity::Critical,
            AlertState::Resolved,
            "north",
        );
        assert_eq!(r.sinks_for(&res), vec!["north"]);
        res.active_since_ms = None;
        assert!(r.sinks_for(&res).is_empty());
        let pending = t(
            "boiler-hot",
            "gw-1",
            Severity::Critical,
            AlertState::Pending,
            "north",
        );
        assert!(r.sinks_for(&pending).is_empty());
    }
}
