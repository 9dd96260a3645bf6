//! What one VM (one worker thread) keeps for a stage between requests: the compiled
//! configuration plus the keys registered at runtime, the key-state
//! snapshot and chooser, and this worker's queue of decision records.

use super::host::Host;
use crate::config::Config;
use crate::key_record::Effective;
use crate::keys::{Chooser, Snapshot};
use crate::runtime_keys;
use std::collections::VecDeque;
use std::rc::Rc;

/// Per-VM state of one stage: what requests are routed with.
pub struct WorkerState {
    /// The configuration as compiled from the plugin JSON.
    pub base: Rc<Config>,
    /// `base` plus the keys registered at runtime: what requests use.
    pub config: Rc<Config>,
    /// The registry change counter `config` was built from.
    pub registry_changes: u64,
    pub snapshot: Snapshot,
    pub chooser: Chooser,
    /// This worker's decision ring: its id and the next slot to write.
    pub ring_worker: Option<u64>,
    pub ring_next: u64,
    /// The attempt stage keeps the key gauges current.
    pub gauges: bool,
    /// When the key forecast gauges were last written (at most once a
    /// second: rates change with every request).
    pub forecasts_at_ms: u64,
    /// Decision records not yet written to this worker's ring, newest last
    /// (at most `ring_size`; written on the tick).
    pub pending_decisions: VecDeque<(u64, Vec<u8>)>,
    /// Alert events this VM claimed, waiting for the tick to post them.
    pub alerts: crate::alerts::Outbox,
}

impl WorkerState {
    pub fn new(base: Rc<Config>) -> WorkerState {
        WorkerState {
            config: base.clone(),
            base,
            registry_changes: 0,
            snapshot: Snapshot::default(),
            chooser: Chooser::default(),
            ring_worker: None,
            ring_next: 0,
            gauges: false,
            forecasts_at_ms: 0,
            pending_decisions: VecDeque::new(),
            alerts: crate::alerts::Outbox::default(),
        }
    }

    /// Queues a decision record for this worker's ring.
    pub fn queue_decision(&mut self, record: Vec<u8>) {
        let size = self.config.decisions.ring_size;
        if self.ring_worker.is_none() || size == 0 {
            return;
        }
        let seq = self.ring_next;
        self.ring_next += 1;
        if self.pending_decisions.len() >= size {
            self.pending_decisions.pop_front();
        }
        self.pending_decisions.push_back((seq, record));
    }

    /// Writes the queued decision records to this worker's ring in shared
    /// data: one unconditional write each, since only this VM writes it.
    pub fn flush_decisions(&mut self, h: &dyn Host) {
        let (Some(worker), size) = (self.ring_worker, self.config.decisions.ring_size as u64) else { return };
        if size == 0 {
            return;
        }
        for (seq, rec) in self.pending_decisions.drain(..) {
            let _ = h.store().set(&crate::shared_data::decision_slot(worker, (seq % size) as usize), &rec, None);
        }
    }

    /// Brings the snapshot up to date; when it reloaded, also picks up keys
    /// registered or deleted at runtime and refreshes the key gauges.
    /// Returns the configuration requests should use now.
    pub fn refresh(&mut self, h: &dyn Host, now: u64) -> Rc<Config> {
        let store = h.store();
        if self.snapshot.refresh(store, &self.config, now) {
            let changes = runtime_keys::changes(store);
            if changes != self.registry_changes {
                self.registry_changes = changes;
                match runtime_keys::merged(&self.base, &runtime_keys::load(store)) {
                    Ok(c) => {
                        log::info!("runtime keys changed: {} keys now", c.keys.count());
                        self.config = Rc::new(c);
                        self.snapshot.refresh(store, &self.config, now);
                    }
                    Err(e) => log::warn!("runtime keys not applied: {e}"),
                }
            }
            if self.gauges {
                let cfg = self.config.clone();
                let forecasts = now >= self.forecasts_at_ms.saturating_add(1000);
                if forecasts {
                    self.forecasts_at_ms = now;
                }
                for (k, key) in cfg.keys.live() {
                    let e = self.snapshot.eval(&cfg, k, now);
                    let eff = self.snapshot.records.get(k).map_or(Effective::Available, |r| r.effective(now));
                    let pid = cfg.providers.get(key.provider).map_or("", |p| p.id.as_str());
                    for (name, value) in crate::metrics::key_gauges(pid, &key.id, &e, eff) {
                        h.gauge(&name, value);
                    }
                    // Only keys with quotas have a runway to show.
                    if forecasts && key.limits != crate::quota::Limits::default() {
                        let r = self.snapshot.records.get(k).copied().unwrap_or_default();
                        let f = crate::forecast::key(&r, &key.limits, now);
                        for (name, value) in crate::metrics::key_forecast_gauges(pid, &key.id, &f, now) {
                            h.gauge(&name, value);
                        }
                    }
                }
            }
        }
        self.config.clone()
    }
}
