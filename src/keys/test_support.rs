//! Configurations and helpers the key tests share.

use super::*;
use crate::config::compile;
use crate::config::Config;
use crate::key_record::KeyRecord;
use crate::objective::Objective;

pub fn cfg_with(keys: &[&str], extra: &str) -> Config {
    let keys: Vec<String> =
        keys.iter().enumerate().map(|(i, k)| format!(r#"{{"id":"k{i}","secret":"s{i}"{k}}}"#)).collect();
    let json = format!(r#"{{"providers":[{{"id":"p","keys":[{}]}}]{extra}}}"#, keys.join(","));
    match compile(json.as_bytes(), &|_| None) {
        Ok(c) => c,
        Err(e) => panic!("{e}: {json}"),
    }
}

pub fn cfg(weights: &[u32]) -> Config {
    let ks: Vec<String> = weights.iter().map(|w| format!(r#","weight":{w}"#)).collect();
    let refs: Vec<&str> = ks.iter().map(String::as_str).collect();
    cfg_with(&refs, "")
}

pub fn obj(s: &str) -> Objective {
    match Objective::parse_str(s) {
        Ok(o) => o,
        Err(e) => panic!("{e}"),
    }
}

pub fn pick(c: &mut Chooser, cfg: &Config, recs: &[KeyRecord], now: u64, o: &Objective) -> Option<usize> {
    c.choose(cfg, 0, &mut Snapshot::of(recs.to_vec()), now, &[], o).ok().and_then(|d| d.chosen)
}

pub fn counts(cfg: &Config, recs: &[KeyRecord], o: &Objective, n: usize) -> Vec<usize> {
    let mut c = Chooser::default();
    let mut out = vec![0; cfg.keys.slots()];
    for _ in 0..n {
        if let Some(k) = pick(&mut c, cfg, recs, 0, o) {
            out[k] += 1;
        }
    }
    out
}
