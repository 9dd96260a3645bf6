//! Routing objectives: what "the best key" means for a request.
//!
//! An objective is one goal (`cost`, `reliability`, `fairness`, `latency`,
//! `headroom`, `runway`) or a weighted combination, plus optional constraints. It is
//! written as a bare name (`"cost"`) or as JSON:
//!
//! ```json
//! {"primary": "cost", "weights": {"cost": 0.5, "reliability": 0.3, "fairness": 0.2},
//!  "constraints": {"min_reliability": 0.95, "max_cost_per_1k": 0.02}}
//! ```
//!
//! The same syntax is accepted in config (`routing.objective`), in route
//! metadata and in the `x-apikeyrouter-objective` request header.

use serde_json::{Map, Value};
use std::fmt;

/// One thing a key can be good at. Every score is in `[0, 1]`, higher better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Cost = 0,
    Reliability = 1,
    Fairness = 2,
    Latency = 3,
    Headroom = 4,
    /// How long the key's quotas last at their burn rate, against the time
    /// until they reset ([`crate::forecast::runway_score`]).
    Runway = 5,
}

pub const GOALS: [Goal; 6] =
    [Goal::Cost, Goal::Reliability, Goal::Fairness, Goal::Latency, Goal::Headroom, Goal::Runway];

impl Goal {
    pub fn parse(s: &str) -> Option<Goal> {
        match s.trim() {
            "cost" => Some(Goal::Cost),
            "reliability" => Some(Goal::Reliability),
            "fairness" => Some(Goal::Fairness),
            "latency" => Some(Goal::Latency),
            "headroom" => Some(Goal::Headroom),
            "runway" => Some(Goal::Runway),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Cost => "cost",
            Goal::Reliability => "reliability",
            Goal::Fairness => "fairness",
            Goal::Latency => "latency",
            Goal::Headroom => "headroom",
            Goal::Runway => "runway",
        }
    }
}

/// A compiled objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub primary: Goal,
    /// Normalised weights, indexed by `Goal as usize`; they sum to 1.
    pub weights: [f64; 6],
    pub min_reliability: Option<f64>,
    pub max_cost_per_1k: Option<f64>,
    /// Short text for headers and decision records, e.g. `cost` or
    /// `cost=0.5,reliability=0.3,fairness=0.2`.
    pub label: String,
}

impl Default for Objective {
    fn default() -> Objective {
        Objective::single(Goal::Fairness)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectiveError(pub String);

impl fmt::Display for ObjectiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(msg: impl Into<String>) -> ObjectiveError {
    ObjectiveError(msg.into())
}

const NAMES: &str = "cost, reliability, fairness, latency, headroom or runway";

impl Objective {
    pub fn single(goal: Goal) -> Objective {
        let mut weights = [0.0; 6];
        weights[goal as usize] = 1.0;
        Objective {
            primary: goal,
            weights,
            min_reliability: None,
            max_cost_per_1k: None,
            label: goal.as_str().to_string(),
        }
    }

    /// Parses a header value or a metadata string: a bare goal name, or JSON.
    pub fn parse_str(s: &str) -> Result<Objective, ObjectiveError> {
        let t = s.trim();
        if t.starts_with('{') {
            let v: Value = serde_json::from_str(t).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            Objective::from_value(&v)
        } else {
            Goal::parse(t)
                .map(Objective::single)
                .ok_or_else(|| bad(format!("unknown objective {t:?} (expected {NAMES})")))
        }
    }

    /// Parses the JSON form (or a JSON string holding a bare name).
    pub fn from_value(v: &Value) -> Result<Objective, ObjectiveError> {
        let obj = match v {
            Value::String(s) => return Objective::parse_str(s),
            Value::Object(o) => o,
            _ => return Err(bad("expected a goal name or an object")),
        };
        for k in obj.keys() {
            if !matches!(k.as_str(), "primary" | "secondary" | "weights" | "constraints") {
                return Err(bad(format!("unknown field {k:?}")));
            }
        }
        let primary = match obj.get("primary") {
            Some(Value::String(s)) => {
                Goal::parse(s).ok_or_else(|| bad(format!("primary: unknown goal {s:?} (expected {NAMES})")))?
            }
            Some(_) => return Err(bad("primary: expected a goal name")),
            None => return Err(bad("primary: required")),
        };
        let mut weights = [0.0f64; 6];
        match obj.get("weights") {
            Some(Value::Object(w)) => {
                for (k, v) in w {
                    let g = Goal::parse(k).ok_or_else(|| bad(format!("weights: unknown goal {k:?}")))?;
                    let x = v
                        .as_f64()
                        .filter(|x| x.is_finite() && *x >= 0.0)
                        .ok_or_else(|| bad(format!("weights.{k}: expected a number >= 0")))?;
                    weights[g as usize] = x;
                }
                if weights[primary as usize] == 0.0 && !w.contains_key(primary.as_str()) {
                    weights[primary as usize] = 1.0 - weights.iter().sum::<f64>().min(1.0);
                }
            }
            Some(_) => return Err(bad("weights: expected an object")),
            None => {
                let secondary = secondary_goals(obj)?;
                if secondary.is_empty() {
                    weights[primary as usize] = 1.0;
                } else {
                    weights[primary as usize] = 0.6;
                    for g in &secondary {
                        weights[*g as usize] += 0.4 / secondary.len() as f64;
                    }
                }
            }
        }
        let sum: f64 = weights.iter().sum();
        if sum <= 0.0 {
            return Err(bad("weights: at least one must be above 0"));
        }
        for w in weights.iter_mut() {
            *w /= sum;
        }
        let (mut min_reliability, mut max_cost_per_1k) = (None, None);
        match obj.get("constraints") {
            None | Some(Value::Null) => {}
            Some(Value::Object(c)) => {
                for (k, v) in c {
                    let x = v.as_f64().filter(|x| x.is_finite() && *x >= 0.0);
                    match k.as_str() {
                        "min_reliability" => {
                            min_reliability = Some(
                                x.filter(|x| *x <= 1.0)
                                    .ok_or_else(|| bad("constraints.min_reliability: expected a number from 0 to 1"))?,
                            )
                        }
                        "max_cost_per_1k" => {
                            max_cost_per_1k =
                                Some(x.ok_or_else(|| bad("constraints.max_cost_per_1k: expected a number >= 0"))?)
                        }
                        other => return Err(bad(format!("constraints: unknown constraint {other:?}"))),
                    }
                }
            }
            Some(_) => return Err(bad("constraints: expected an object")),
        }
        let mut label = label_of(primary, &weights);
        if let Some(r) = min_reliability {
            label.push_str(&format!(";min_reliability={r}"));
        }
        if let Some(c) = max_cost_per_1k {
            label.push_str(&format!(";max_cost_per_1k={c}"));
        }
        Ok(Objective { primary, weights, min_reliability, max_cost_per_1k, label })
    }

    pub fn weight(&self, g: Goal) -> f64 {
        self.weights[g as usize]
    }
}

fn secondary_goals(obj: &Map<String, Value>) -> Result<Vec<Goal>, ObjectiveError> {
    match obj.get("secondary") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().and_then(Goal::parse).ok_or_else(|| bad(format!("secondary: expected goal names ({NAMES})")))
            })
            .collect(),
        Some(_) => Err(bad("secondary: expected an array of goal names")),
    }
}

fn label_of(primary: Goal, weights: &[f64; 6]) -> String {
    let used: Vec<(Goal, f64)> = GOALS.iter().map(|g| (*g, weights[*g as usize])).filter(|(_, w)| *w > 0.0).collect();
    if used.len() == 1 && used[0].0 == primary {
        return primary.as_str().to_string();
    }
    let mut parts: Vec<String> = Vec::new();
    // Primary first, then the others in the fixed goal order.
    for (g, w) in used.iter().filter(|(g, _)| *g == primary).chain(used.iter().filter(|(g, _)| *g != primary)) {
        parts.push(format!("{}={}", g.as_str(), (w * 1000.0).round() / 1000.0));
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Objective {
        match Objective::parse_str(s) {
            Ok(o) => o,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn a_bare_name_is_a_single_goal() {
        let o = parse("cost");
        assert_eq!(o.primary, Goal::Cost);
        assert_eq!(o.weight(Goal::Cost), 1.0);
        assert_eq!(o.label, "cost");
        assert_eq!(Objective::default().label, "fairness");
    }

    #[test]
    fn weights_are_normalised_and_labelled_primary_first() {
        let o = parse(r#"{"primary":"cost","weights":{"cost":0.5,"reliability":0.3,"fairness":0.2}}"#);
        assert!((o.weight(Goal::Cost) - 0.5).abs() < 1e-9);
        assert!((o.weight(Goal::Fairness) - 0.2).abs() < 1e-9);
        assert_eq!(o.label, "cost=0.5,reliability=0.3,fairness=0.2");
        let o = parse(r#"{"primary":"latency","weights":{"latency":2,"headroom":2}}"#);
        assert!((o.weight(Goal::Latency) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn runway_weighs_into_headroom() {
        let o = parse(r#"{"primary":"headroom","weights":{"headroom":0.6,"runway":0.4}}"#);
        assert!((o.weight(Goal::Runway) - 0.4).abs() < 1e-9);
        assert_eq!(o.label, "headroom=0.6,runway=0.4");
        assert_eq!(parse("runway").weight(Goal::Runway), 1.0);
    }

    #[test]
    fn secondary_goals_share_forty_percent() {
        let o = parse(r#"{"primary":"cost","secondary":["reliability","fairness"]}"#);
        assert!((o.weight(Goal::Cost) - 0.6).abs() < 1e-9);
        assert!((o.weight(Goal::Reliability) - 0.2).abs() < 1e-9);
    }

    #[test]
    fn constraints_are_read() {
        let o = parse(r#"{"primary":"cost","constraints":{"min_reliability":0.95,"max_cost_per_1k":0.02}}"#);
        assert_eq!(o.min_reliability, Some(0.95));
        assert_eq!(o.max_cost_per_1k, Some(0.02));
        assert_eq!(o.label, "cost;min_reliability=0.95;max_cost_per_1k=0.02");
    }

    #[test]
    fn bad_objectives_say_why() {
        for (s, why) in [
            ("cheapest", "unknown objective"),
            ("{", "not valid JSON"),
            (r#"{"weights":{}}"#, "primary: required"),
            (r#"{"primary":"cost","weights":{"speed":1}}"#, "unknown goal"),
            (r#"{"primary":"cost","weights":{"cost":-1}}"#, ">= 0"),
            (r#"{"primary":"cost","weights":{"cost":0}}"#, "at least one"),
            (r#"{"primary":"cost","constraints":{"min_reliability":2}}"#, "from 0 to 1"),
            (r#"{"primary":"cost","constraints":{"max_latency":2}}"#, "unknown constraint"),
            (r#"{"primary":"cost","extra":1}"#, "unknown field"),
        ] {
            match Objective::parse_str(s) {
                Ok(_) => panic!("{s} accepted"),
                Err(e) => assert!(e.0.contains(why), "{s}: {e}"),
            }
        }
    }
}
