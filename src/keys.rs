//! Choosing a key and changing key state.
//!
//! Each VM keeps a [`KeyCache`] of every key's eligibility. A request reads
//! one small generation record from shared data; only when another worker
//! changed some key's state (cooldown, disable) does the cache reload the key
//! records. Counter updates do not bump the generation, so the common path
//! costs one shared-data read however many keys there are.

use crate::config::Config;
use crate::state::{DecodeError, Effective, KeyRecord, KeyState, Outcome};
use crate::store::{update, Store, UpdateError, UpdateStats};

/// Shared-data name of the state generation counter.
pub const GEN_KEY: &str = "akr.v1.gen";

/// The part of a key's record that decides eligibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyView {
    pub state: KeyState,
    pub cooldown_until_ms: u64,
}

impl KeyView {
    pub fn effective(&self, now_ms: u64) -> Effective {
        KeyRecord {
            state: self.state,
            cooldown_until_ms: self.cooldown_until_ms,
            ..KeyRecord::default()
        }
        .effective(now_ms)
    }
}

fn read_gen(store: &dyn Store) -> u64 {
    store
        .get(GEN_KEY)
        .0
        .and_then(|b| b.as_slice().try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// Announces a key-state change to every worker.
pub fn bump_gen(store: &dyn Store) -> UpdateStats {
    let (_, stats) = update(store, GEN_KEY, |cur| {
        let v = cur
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
            .wrapping_add(1);
        Ok::<_, ()>(((), v.to_le_bytes().to_vec()))
    });
    stats
}

/// Reads a key record; absent or damaged records read as fresh.
pub fn read_record(store: &dyn Store, name: &str) -> Result<KeyRecord, DecodeError> {
    match store.get(name).0 {
        None => Ok(KeyRecord::default()),
        Some(b) => KeyRecord::decode(&b),
    }
}

/// Per-VM cache of every key's eligibility, refreshed on generation change.
#[derive(Debug, Default)]
pub struct KeyCache {
    gen: Option<u64>,
    pub views: Vec<KeyView>,
}

impl KeyCache {
    /// Brings the cache up to date; returns whether it reloaded.
    pub fn refresh(&mut self, store: &dyn Store, cfg: &Config) -> bool {
        let gen = read_gen(store);
        if self.gen == Some(gen) && self.views.len() == cfg.keys.len() {
            return false;
        }
        self.views = cfg
            .keys
            .iter()
            .map(|k| match read_record(store, &k.record_name) {
                Ok(r) => KeyView {
                    state: r.state,
                    cooldown_until_ms: r.cooldown_until_ms,
                },
                Err(e) => {
                    log::warn!(
                        "key {}: state record unreadable ({e}); treating as available",
                        k.id
                    );
                    KeyView::default()
                }
            })
            .collect();
        self.gen = Some(gen);
        true
    }

    /// Forgets the cached generation so the next refresh reloads.
    pub fn invalidate(&mut self) {
        self.gen = None;
    }
}

/// Why no key could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoKey {
    pub throttled: usize,
    pub disabled: usize,
    pub exhausted: usize,
    /// The earliest instant a throttled key becomes available again.
    pub earliest_recovery_ms: Option<u64>,
}

impl NoKey {
    /// Seconds until the earliest recovery, rounded up, at least 1.
    pub fn retry_after_secs(&self, now_ms: u64) -> u64 {
        match self.earliest_recovery_ms {
            Some(t) => t.saturating_sub(now_ms).div_ceil(1000).max(1),
            None => 60,
        }
    }

    pub fn explain(&self, provider: &str) -> String {
        format!(
            "No API key of provider '{provider}' is available right now: {} cooling down after rate limits, {} disabled, {} exhausted.",
            self.throttled, self.disabled, self.exhausted
        )
    }
}

/// `Ok` when some key of `provider` is available at `now_ms`, otherwise why
/// not. Used to refuse a request before any upstream attempt.
pub fn check(cfg: &Config, provider: usize, views: &[KeyView], now_ms: u64) -> Result<(), NoKey> {
    let Some(p) = cfg.providers.get(provider) else {
        return Err(NoKey::default());
    };
    let mut none = NoKey::default();
    for &k in &p.keys {
        match views.get(k).map(|v| v.effective(now_ms)) {
            Some(Effective::Available) | None => return Ok(()),
            Some(Effective::Throttled { until_ms }) => {
                none.throttled += 1;
                none.earliest_recovery_ms = Some(
                    none.earliest_recovery_ms
                        .map_or(until_ms, |t| t.min(until_ms)),
                );
            }
            Some(Effective::Disabled) => none.disabled += 1,
            Some(Effective::Exhausted) => none.exhausted += 1,
        }
    }
    Err(none)
}

/// Smooth weighted round-robin (as in nginx) over the eligible keys: an even
/// spread by weight, deterministic, and O(keys) per pick.
#[derive(Debug, Default)]
pub struct Spread {
    current: Vec<i64>,
}

impl Spread {
    /// Chooses a key of `provider` that is available at `now_ms`, preferring
    /// keys not in `tried` (keys this request already used).
    pub fn choose(
        &mut self,
        cfg: &Config,
        provider: usize,
        views: &[KeyView],
        now_ms: u64,
        tried: &[usize],
    ) -> Result<usize, NoKey> {
        if self.current.len() != cfg.keys.len() {
            self.current = vec![0; cfg.keys.len()];
        }
        let Some(p) = cfg.providers.get(provider) else {
            return Err(NoKey::default());
        };
        let eligible_untried = p.keys.iter().any(|&k| {
            !tried.contains(&k)
                && matches!(
                    views.get(k).map(|v| v.effective(now_ms)),
                    Some(Effective::Available) | None
                )
        });
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for &k in &p.keys {
            let available = matches!(
                views.get(k).map(|v| v.effective(now_ms)),
                Some(Effective::Available) | None
            );
            if !available || (eligible_untried && tried.contains(&k)) {
                continue;
            }
            let w = cfg.keys.get(k).map_or(1, |key| key.weight as i64);
            self.current[k] += w;
            total += w;
            if best.is_none_or(|b| self.current[k] > self.current[b]) {
                best = Some(k);
            }
        }
        match best {
            Some(b) => {
                self.current[b] -= total;
                Ok(b)
            }
            None => Err(check(cfg, provider, views, now_ms)
                .err()
                .unwrap_or_default()),
        }
    }
}

/// What a 429 did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooledDown {
    pub until_ms: u64,
    /// False when an existing, longer cooldown was kept.
    pub extended: bool,
}

/// Records a finished attempt and, when `cool_until_ms` is given, puts the key
/// into cooldown until then (never shortening one). Bumps the generation when
/// the key's eligibility changed, so every worker sees it on its next request.
pub fn record_attempt(
    store: &dyn Store,
    record_name: &str,
    outcome: &Outcome,
    cool_until_ms: Option<u64>,
) -> (
    Result<Option<CooledDown>, UpdateError<DecodeError>>,
    UpdateStats,
) {
    let (r, mut stats) = update(store, record_name, |cur| {
        let mut rec = match cur {
            None => KeyRecord::default(),
            Some(b) => KeyRecord::decode(b)?,
        };
        rec.record(outcome);
        let cooled = cool_until_ms.map(|until| {
            let extended = rec.cool_until(until);
            if extended {
                rec.cooldowns += 1;
            }
            CooledDown {
                until_ms: rec.cooldown_until_ms,
                extended,
            }
        });
        Ok((cooled, rec.encode()))
    });
    if let Ok(Some(CooledDown { extended: true, .. })) = r {
        stats.conflicts += bump_gen(store).conflicts;
    }
    (r, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;
    use crate::store::FakeStore;
    use crate::usage::Usage;

    fn cfg(weights: &[u32]) -> Config {
        let keys: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!(r#"{{"id":"k{i}","secret":"s{i}","weight":{w}}}"#))
            .collect();
        let json = format!(
            r#"{{"providers":[{{"id":"p","keys":[{}]}}]}}"#,
            keys.join(",")
        );
        match compile(json.as_bytes(), &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn pick_counts(c: &Config, views: &[KeyView], n: usize) -> Vec<usize> {
        let mut s = Spread::default();
        let mut counts = vec![0; c.keys.len()];
        for _ in 0..n {
            if let Ok(k) = s.choose(c, 0, views, 0, &[]) {
                counts[k] += 1;
            }
        }
        counts
    }

    #[test]
    fn equal_keys_share_requests_evenly() {
        let c = cfg(&[1, 1, 1, 1]);
        let views = vec![KeyView::default(); 4];
        assert_eq!(pick_counts(&c, &views, 400), vec![100; 4]);
    }

    #[test]
    fn weights_set_the_share() {
        let c = cfg(&[1, 3]);
        let views = vec![KeyView::default(); 2];
        assert_eq!(pick_counts(&c, &views, 400), vec![100, 300]);
    }

    #[test]
    fn cooled_down_key_is_not_selected_until_its_deadline() {
        let c = cfg(&[1, 1]);
        let views = vec![
            KeyView {
                cooldown_until_ms: 5_000,
                ..KeyView::default()
            },
            KeyView::default(),
        ];
        let mut s = Spread::default();
        for now in [0, 1_000, 4_999] {
            assert_eq!(s.choose(&c, 0, &views, now, &[]), Ok(1));
        }
        let later: Vec<usize> = (0..4)
            .filter_map(|_| s.choose(&c, 0, &views, 5_000, &[]).ok())
            .collect();
        assert!(later.contains(&0), "{later:?}");
    }

    #[test]
    fn disabled_and_exhausted_keys_are_never_chosen() {
        let c = cfg(&[1, 1, 1]);
        let views = vec![
            KeyView {
                state: KeyState::Disabled,
                ..KeyView::default()
            },
            KeyView {
                state: KeyState::Exhausted,
                ..KeyView::default()
            },
            KeyView::default(),
        ];
        assert_eq!(pick_counts(&c, &views, 10), vec![0, 0, 10]);
    }

    #[test]
    fn a_retry_prefers_a_key_this_request_has_not_tried() {
        let c = cfg(&[1, 1, 1]);
        let views = vec![KeyView::default(); 3];
        let mut s = Spread::default();
        for _ in 0..20 {
            let k = s.choose(&c, 0, &views, 0, &[0, 1]);
            assert_eq!(k, Ok(2));
        }
        // Every key tried: reuse rather than fail.
        assert!(s.choose(&c, 0, &views, 0, &[0, 1, 2]).is_ok());
    }

    #[test]
    fn no_eligible_key_reports_why_and_the_earliest_recovery() {
        let c = cfg(&[1, 1, 1]);
        let views = vec![
            KeyView {
                cooldown_until_ms: 9_000,
                ..KeyView::default()
            },
            KeyView {
                cooldown_until_ms: 4_500,
                ..KeyView::default()
            },
            KeyView {
                state: KeyState::Disabled,
                ..KeyView::default()
            },
        ];
        let e = Spread::default().choose(&c, 0, &views, 1_000, &[]);
        let Err(e) = e else {
            panic!("a key was chosen")
        };
        assert_eq!((e.throttled, e.disabled, e.exhausted), (2, 1, 0));
        assert_eq!(e.earliest_recovery_ms, Some(4_500));
        assert_eq!(e.retry_after_secs(1_000), 4);
        assert!(e.explain("p").contains("2 cooling down"));
    }

    #[test]
    fn cache_reloads_only_when_the_generation_changes() {
        let c = cfg(&[1, 1]);
        let store = FakeStore::new();
        let mut cache = KeyCache::default();
        assert!(cache.refresh(&store, &c));
        assert!(!cache.refresh(&store, &c));
        // Counters alone do not bump the generation.
        let ok = Outcome {
            status: 200,
            usage: Some(Usage {
                input: 1,
                output: 1,
                total: 2,
            }),
            stream: false,
        };
        let _ = record_attempt(&store, &c.keys[0].record_name, &ok, None);
        assert!(!cache.refresh(&store, &c));
        // A cooldown does.
        let limited = Outcome {
            status: 429,
            ..Outcome::default()
        };
        let _ = record_attempt(&store, &c.keys[0].record_name, &limited, Some(7_000));
        assert!(cache.refresh(&store, &c));
        assert_eq!(cache.views[0].cooldown_until_ms, 7_000);
    }

    #[test]
    fn a_shorter_cooldown_keeps_the_longer_one_and_does_not_bump() {
        let c = cfg(&[1]);
        let store = FakeStore::new();
        let name = &c.keys[0].record_name;
        let limited = Outcome {
            status: 429,
            ..Outcome::default()
        };
        let (r, _) = record_attempt(&store, name, &limited, Some(10_000));
        assert_eq!(
            r,
            Ok(Some(CooledDown {
                until_ms: 10_000,
                extended: true
            }))
        );
        let gen = read_gen(&store);
        let (r, _) = record_attempt(&store, name, &limited, Some(6_000));
        assert_eq!(
            r,
            Ok(Some(CooledDown {
                until_ms: 10_000,
                extended: false
            }))
        );
        assert_eq!(read_gen(&store), gen);
        let rec = read_record(&store, name);
        assert_eq!(
            rec.map(|r| (r.requests, r.rate_limited, r.cooldowns)),
            Ok((2, 2, 1))
        );
    }
}
