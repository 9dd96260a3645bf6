//! Exact cost accounting: prices, the cost of a request, and budgets that
//! reserve an upper-bound estimate at admission and true up to the actual
//! cost when the response completes.
//!
//! Amounts are `rust_decimal::Decimal` throughout; nothing is rounded until
//! it is shown. A budget's state is one record per budget in shared data,
//! updated through the CAS helper: reserving checks `spent + reserved +
//! estimate <= limit` and adds the estimate in the same swap, so concurrent
//! requests cannot overspend a hard budget.

use crate::codec::{Reader, Writer};
use crate::store::{update, Store, UpdateError};
use crate::usage::Usage;
use crate::window::Window;
use rust_decimal::Decimal;
use std::fmt;

/// Prices per 1,000,000 tokens, or one price per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub input: Decimal,
    pub output: Decimal,
    pub cached_input: Decimal,
    /// The price of one answered request (image generation, speech),
    /// whatever its tokens; the token prices are zero then.
    pub per_request: Option<Decimal>,
}

/// The model price table: exact names, and prefixes written `name*`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PriceTable {
    exact: Vec<(String, Price)>,
    /// Longest prefix first.
    prefix: Vec<(String, Price)>,
}

impl PriceTable {
    pub fn insert(&mut self, model: &str, price: Price) {
        match model.strip_suffix('*') {
            Some(p) => {
                self.prefix.push((p.to_string(), price));
                self.prefix.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
            }
            None => self.exact.push((model.to_string(), price)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefix.is_empty()
    }

    /// The price of `model`: an exact entry, else the longest matching prefix.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        self.entry(model).map(|(_, p, _)| p)
    }

    /// The entry that prices `model`: its name, price, and whether it is a
    /// prefix entry.
    fn entry(&self, model: &str) -> Option<(&str, &Price, bool)> {
        self.exact.iter().find(|(m, _)| m == model).map(|(m, p)| (m.as_str(), p, false)).or_else(|| {
            self.prefix.iter().find(|(p, _)| model.starts_with(p.as_str())).map(|(m, p)| (m.as_str(), p, true))
        })
    }

    /// The label metrics give `model`: the name of the table entry that
    /// prices it as configured (`gpt-4o`, or `gpt-4o*` for a prefix), else
    /// `other`, so that the labels are as many as the table's entries.
    /// Characters other than letters, digits and `. _ - * /` show as `_`.
    pub fn label(&self, model: Option<&str>) -> String {
        let Some((name, _, prefix)) = model.and_then(|m| self.entry(m)) else { return OTHER_MODEL.to_string() };
        let clean = |c: char| if c.is_ascii_alphanumeric() || ".-_/".contains(c) { c } else { '_' };
        let mut out: String = name.chars().take(64).map(clean).collect();
        if prefix {
            out.push('*');
        }
        out
    }
}

/// The model label of models the price table does not name.
pub const OTHER_MODEL: &str = "other";

/// How a key's price differs from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyPricing {
    /// A flat price per 1,000 tokens of any kind; wins over the table.
    pub cost_per_1k: Option<Decimal>,
    /// Multiplies the table price (discounted keys); 1 when absent.
    pub multiplier: Option<Decimal>,
}

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);
const THOUSAND: Decimal = Decimal::from_parts(1000, 0, 0, false, 0);

/// Exact cost of `usage`. `None` when neither the key nor the table prices it.
/// A per-request price wins over the key's flat price: it is not a token
/// price; the key's multiplier still applies.
pub fn cost(usage: &Usage, price: Option<&Price>, key: &KeyPricing) -> Option<Decimal> {
    if let Some(one) = price.and_then(|p| p.per_request) {
        return Some(one * key.multiplier.unwrap_or(Decimal::ONE));
    }
    if let Some(flat) = key.cost_per_1k {
        return Some(Decimal::from(usage.total) * flat / THOUSAND);
    }
    let p = price?;
    let cached = usage.cached_input.min(usage.input);
    let fresh = usage.input - cached;
    let c = (Decimal::from(fresh) * p.input
        + Decimal::from(cached) * p.cached_input
        + Decimal::from(usage.output) * p.output)
        / MILLION;
    Some(c * key.multiplier.unwrap_or(Decimal::ONE))
}

/// Upper-bound cost of a request before it runs: every prompt token at the
/// uncached input price, every allowed output token at the output price.
pub fn estimate(prompt_tokens: u64, output_tokens: u64, price: Option<&Price>, key: &KeyPricing) -> Decimal {
    let u = Usage {
        input: prompt_tokens,
        output: output_tokens,
        total: prompt_tokens.saturating_add(output_tokens),
        cached_input: 0,
        reasoning: 0,
    };
    cost(&u, price, key).unwrap_or_default()
}

/// The largest estimate over the pricings a request might be served with.
pub fn worst_estimate(
    prompt_tokens: u64,
    output_tokens: u64,
    price: Option<&Price>,
    pricings: &[KeyPricing],
) -> Decimal {
    pricings
        .iter()
        .map(|k| estimate(prompt_tokens, output_tokens, price, k))
        .max()
        .unwrap_or_else(|| estimate(prompt_tokens, output_tokens, price, &KeyPricing::default()))
}

/// What a budget covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Provider(usize),
    Key(usize),
    Model(String),
    Client(String),
    Team(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Refuses a request that could take spend past the limit.
    Hard,
    /// Lets it through, flagged.
    Soft,
}

/// A compiled budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub id: String,
    pub scope: Scope,
    /// `None`: the total, never reset.
    pub window: Option<Window>,
    pub limit: Decimal,
    pub enforcement: Enforcement,
    pub record_name: String,
    /// How long a reservation may stay held before it expires (its request
    /// lost: a callback that never came, a VM reload).
    pub reservation_ttl_ms: u64,
    /// Fractions of the limit whose crossing posts an alert (sorted, at most
    /// [`MAX_ALERTS`]).
    pub alerts: Vec<Decimal>,
}

/// The most alert thresholds a budget may have (one bit each in its record).
pub const MAX_ALERTS: usize = 16;
/// The largest alert threshold: 10 times the limit (a soft budget goes over).
pub const MAX_ALERT: Decimal = Decimal::from_parts(10, 0, 0, false, 0);

/// The default of `reservation_ttl_seconds`: the shipped routes' 600 s
/// timeout plus a margin.
pub const DEFAULT_RESERVATION_TTL_MS: u64 = 660_000;

impl Budget {
    /// The width of one expiry bucket: a quarter of the reservation TTL, so a
    /// reservation expires between its TTL and 1.25 times it.
    fn bucket_ms(&self) -> u64 {
        (self.reservation_ttl_ms / 4).max(1000)
    }

    /// The expiry bucket of a reservation made at `now_ms` (never 0).
    fn bucket_of(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.reservation_ttl_ms).div_ceil(self.bucket_ms()).max(1)
    }

    pub fn window_start(&self, now_ms: u64) -> u64 {
        self.window.map_or(0, |w| w.start(now_ms))
    }

    /// When the current window ends (`None` for a total).
    pub fn resets_at(&self, now_ms: u64) -> Option<u64> {
        self.window.map(|w| w.next_start(now_ms))
    }
}

/// Reservations that expire together: their expiry bucket (0: an empty
/// slot), total amount and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    pub bucket: u64,
    pub amount: Decimal,
    pub count: u32,
}

/// Expiry buckets a record keeps: live reservations span at most five.
pub const PENDING_SLOTS: usize = 6;

/// A budget's state in shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetRecord {
    pub window_start_ms: u64,
    pub spent: Decimal,
    /// Held by requests in flight: the sum of `pending`.
    pub reserved: Decimal,
    /// `reserved` by expiry bucket.
    pub pending: [Pending; PENDING_SLOTS],
    /// Reservations of this window that expired unsettled.
    pub expired: u64,
    pub requests: u64,
    pub refused: u64,
    /// The window in which the soft-limit warning was last logged.
    pub soft_logged_window: u64,
    /// A limit set through the admin API, overriding the configured one.
    pub limit_override: Option<Decimal>,
    /// Fleet mode: what the other instances spent in the window starting at
    /// `fleet_window_ms`, as of the last sync with etcd.
    pub fleet_spent: Decimal,
    pub fleet_window_ms: u64,
    /// Fleet mode, while etcd cannot be reached: the fraction of the limit
    /// this instance may spend by itself.
    pub local_share: Option<Decimal>,
    /// This instance's spend in millionths in the current and the previous
    /// bucket of [`crate::forecast::BUDGET_BUCKET_MS`], and since when it
    /// was counted: the burn rate's window (an estimate, so rounded to the
    /// millionth). Not reset with the budget's window.
    pub burn_start_ms: u64,
    pub burn_since_ms: u64,
    pub burn_micros: u64,
    pub burn_prev_micros: u64,
    /// The alert thresholds (bit `i`: `Budget::alerts[i]`) crossed in this
    /// window: set in the swap that charges the spend that crosses them, so
    /// that one worker, once, posts each.
    pub alerted: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRecord;

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("budget record unreadable")
    }
}

const VERSION: u8 = 4;
/// Version 1 records (no fleet fields), version 2 (no expiry buckets) and
/// version 3 (no burn rate, no alerts) are still read.
const V1_LEN: usize = 2 + 8 + 16 + 16 + 8 + 8 + 8 + 16;
const V2_LEN: usize = V1_LEN + 16 + 8 + 1 + 16;

impl BudgetRecord {
    pub const LEN: usize = V2_LEN + PENDING_SLOTS * (8 + 16 + 4) + 8 + 4 * 8 + 4;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::with_capacity(Self::LEN);
        out.u8(VERSION).u8(u8::from(self.limit_override.is_some()));
        out.u64(self.window_start_ms).decimal(self.spent).decimal(self.reserved);
        out.u64(self.requests).u64(self.refused).u64(self.soft_logged_window);
        out.decimal(self.limit_override.unwrap_or_default());
        out.decimal(self.fleet_spent).u64(self.fleet_window_ms);
        out.u8(u8::from(self.local_share.is_some())).decimal(self.local_share.unwrap_or_default());
        for p in &self.pending {
            out.u64(p.bucket).decimal(p.amount).u32(p.count);
        }
        out.u64(self.expired);
        out.u64(self.burn_start_ms).u64(self.burn_since_ms).u64(self.burn_micros).u64(self.burn_prev_micros);
        out.u32(self.alerted);
        out.finish()
    }

    pub fn decode(b: &[u8]) -> Result<BudgetRecord, BadRecord> {
        let mut r = Reader::new(b);
        let version = r.u8().filter(|v| (1..=VERSION).contains(v)).ok_or(BadRecord)?;
        let mut rec = Self::fields(&mut r, version >= 2).ok_or(BadRecord)?;
        if version >= 3 {
            for p in rec.pending.iter_mut() {
                *p = Pending {
                    bucket: r.u64().ok_or(BadRecord)?,
                    amount: r.decimal().ok_or(BadRecord)?,
                    count: r.u32().ok_or(BadRecord)?,
                };
            }
            rec.expired = r.u64().ok_or(BadRecord)?;
            if version >= 4 {
                rec.burn_start_ms = r.u64().ok_or(BadRecord)?;
                rec.burn_since_ms = r.u64().ok_or(BadRecord)?;
                rec.burn_micros = r.u64().ok_or(BadRecord)?;
                rec.burn_prev_micros = r.u64().ok_or(BadRecord)?;
                rec.alerted = r.u32().ok_or(BadRecord)?;
            }
        } else if rec.reserved > Decimal::ZERO {
            // Reservations of an older version have no deadline: they expire
            // at the next update.
            rec.pending[0] = Pending { bucket: 1, amount: rec.reserved, count: 1 };
        }
        Ok(rec)
    }

    /// The fields of version 1 and 2 after the version byte; `None` when the
    /// record is short.
    fn fields(r: &mut Reader<'_>, fleet: bool) -> Option<BudgetRecord> {
        let has_override = r.u8()? == 1;
        let mut rec = BudgetRecord {
            window_start_ms: r.u64()?,
            spent: r.decimal()?,
            reserved: r.decimal()?,
            requests: r.u64()?,
            refused: r.u64()?,
            soft_logged_window: r.u64()?,
            limit_override: Some(r.decimal()?).filter(|_| has_override),
            ..BudgetRecord::default()
        };
        if fleet {
            rec.fleet_spent = r.decimal()?;
            rec.fleet_window_ms = r.u64()?;
            let has_share = r.u8()? == 1;
            rec.local_share = Some(r.decimal()?).filter(|_| has_share);
        }
        Some(rec)
    }

    /// The record as of the window containing `now_ms` (rolled over when a
    /// new window began).
    /// Reservations past their deadline are dropped (and counted in
    /// `expired`).
    pub fn current(mut self, budget: &Budget, now_ms: u64) -> BudgetRecord {
        let start = budget.window_start(now_ms);
        if self.window_start_ms != start {
            self.window_start_ms = start;
            self.spent = Decimal::ZERO;
            self.reserved = Decimal::ZERO;
            self.pending = Default::default();
            self.expired = 0;
            self.requests = 0;
            self.refused = 0;
            self.alerted = 0;
        }
        let width = budget.bucket_ms();
        for p in self.pending.iter_mut().filter(|p| p.bucket != 0 && p.bucket.saturating_mul(width) <= now_ms) {
            self.reserved = (self.reserved - p.amount).max(Decimal::ZERO);
            self.expired = self.expired.saturating_add(u64::from(p.count));
            *p = Pending::default();
        }
        self
    }

    /// Counts spend `amount` at `now_ms` in the burn rate's buckets.
    fn count_burn(&mut self, micros: u64, now_ms: u64) {
        crate::forecast::count(
            crate::forecast::BUDGET_BUCKET_MS,
            &mut self.burn_start_ms,
            &mut self.burn_micros,
            &mut self.burn_prev_micros,
            &mut self.burn_since_ms,
            micros,
            now_ms,
        );
    }

    /// This instance's spend per hour over the last 10 to 20 minutes
    /// (`None` while less than [`crate::forecast::MIN_SPAN_MS`] was seen).
    pub fn spend_per_hour(&self, now_ms: u64) -> Option<f64> {
        let (cur, prev) = (self.burn_micros as f64 / 1e6, self.burn_prev_micros as f64 / 1e6);
        crate::forecast::rate_per_ms(
            crate::forecast::BUDGET_BUCKET_MS,
            self.burn_start_ms,
            cur,
            prev,
            self.burn_since_ms,
            now_ms,
        )
        .map(|r| r * 3_600_000.0)
    }

    /// The budget's outlook at `now_ms`: this instance's spend rate, and when
    /// what remains (fleet spend and reservations counted) runs out at it.
    pub fn forecast(&self, budget: &Budget, now_ms: u64) -> crate::forecast::BudgetForecast {
        crate::forecast::BudgetForecast::new(
            self.spend_per_hour(now_ms),
            self.remaining(budget),
            budget.resets_at(now_ms),
        )
    }

    /// What is left to spend: the limit less the spend (in fleet mode the
    /// fleet's) and what is reserved; never below 0.
    #[inline(never)]
    pub fn remaining(&self, budget: &Budget) -> Decimal {
        let spent = self.spent.saturating_add(self.others());
        self.limit(budget).saturating_sub(spent).saturating_sub(self.reserved).max(Decimal::ZERO)
    }

    /// Whether some reservation is past its deadline at `now_ms`.
    pub fn has_expired(&self, budget: &Budget, now_ms: u64) -> bool {
        let width = budget.bucket_ms();
        self.pending.iter().any(|p| p.bucket != 0 && p.bucket.saturating_mul(width) <= now_ms)
    }

    /// Holds `amount` in expiry bucket `bucket`; false when no slot is free
    /// (only a damaged record has more live buckets than slots).
    fn hold(&mut self, amount: Decimal, bucket: u64) -> bool {
        let slot = match self.pending.iter().position(|p| p.bucket == bucket) {
            Some(i) => i,
            None => match self.pending.iter().position(|p| p.bucket == 0) {
                Some(i) => i,
                None => return false,
            },
        };
        let p = &mut self.pending[slot];
        p.bucket = bucket;
        p.amount += amount;
        p.count = p.count.saturating_add(1);
        self.reserved += amount;
        true
    }

    /// Gives back `amount` held in `bucket`; nothing when that bucket has
    /// already expired (its amount left `reserved` then).
    fn unhold(&mut self, amount: Decimal, bucket: u64) {
        let Some(p) = self.pending.iter_mut().find(|p| p.bucket == bucket && bucket != 0) else { return };
        let back = amount.min(p.amount);
        p.amount -= back;
        p.count = p.count.saturating_sub(1);
        let mut freed = back;
        if p.count == 0 {
            freed += p.amount;
            *p = Pending::default();
        }
        self.reserved = (self.reserved - freed).max(Decimal::ZERO);
    }

    pub fn limit(&self, budget: &Budget) -> Decimal {
        self.limit_override.unwrap_or(budget.limit)
    }

    /// What the other instances of the fleet spent in this window (zero
    /// without fleet mode or before the first sync of the window).
    pub fn others(&self) -> Decimal {
        if self.fleet_window_ms == self.window_start_ms {
            self.fleet_spent
        } else {
            Decimal::ZERO
        }
    }

    /// This window's spend: this instance's and, in fleet mode, the others'.
    #[inline(never)]
    pub fn total(&self) -> Decimal {
        self.spent.saturating_add(self.others())
    }

    /// Whether `more` on top of this window's spend and reservations passes
    /// the limit: the fleet's spend against the whole limit, and, while etcd
    /// cannot be reached, this instance's own against its share.
    pub fn would_pass(&self, budget: &Budget, more: Decimal) -> bool {
        let limit = self.limit(budget);
        // Overflow (only from damaged state) counts as passing the limit.
        let Some(own) = self.spent.checked_add(self.reserved).and_then(|x| x.checked_add(more)) else { return true };
        own.checked_add(self.others()).is_none_or(|fleet| fleet > limit)
            || self.local_share.is_some_and(|share| limit.checked_mul(share).is_none_or(|cap| own > cap))
    }
}

fn read(b: Option<&[u8]>) -> Result<BudgetRecord, BadRecord> {
    b.map_or(Ok(BudgetRecord::default()), BudgetRecord::decode)
}

/// Reads a budget's record as of `now_ms`.
pub fn load(store: &dyn Store, budget: &Budget, now_ms: u64) -> BudgetRecord {
    load_raw(store, budget).current(budget, now_ms)
}

/// An amount held against one budget for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub budget: usize,
    pub window_start_ms: u64,
    /// The expiry bucket it is held in.
    pub bucket: u64,
    pub amount: Decimal,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub budget: usize,
    pub spent: Decimal,
    pub reserved: Decimal,
    pub limit: Decimal,
    pub estimate: Decimal,
    pub resets_at_ms: Option<u64>,
}

/// Amounts held for one request (or one attempt) against its budgets. It
/// has one owner at a time and ends exactly once, by
/// [`Reservation::settle`] or [`Reservation::release`].
#[must_use = "a reservation must be settled or released"]
#[derive(Debug, PartialEq, Eq, Default)]
pub struct Reservation(Vec<Held>);

impl Reservation {
    pub fn held(&self) -> &[Held] {
        &self.0
    }

    #[cfg(test)]
    pub(crate) fn of(held: Vec<Held>) -> Reservation {
        Reservation(held)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Replaces each amount with the actual cost; returns each budget's
    /// state after the change.
    pub fn settle(self, store: &dyn Store, budgets: &[Budget], actual: Decimal, now_ms: u64) -> Vec<Settled> {
        settle(store, budgets, &self.0, actual, now_ms)
    }

    /// Gives the amounts back (nothing was served).
    pub fn release(self, store: &dyn Store, budgets: &[Budget], now_ms: u64) {
        release(store, budgets, &self.0, now_ms)
    }
}

/// The result of admitting a request against its budgets.
#[derive(Debug, PartialEq, Eq, Default)]
pub struct Admitted {
    pub held: Reservation,
    /// Soft budgets this request takes over their limit.
    pub over_soft: Vec<usize>,
    /// Soft budgets whose warning should be logged now (once per window).
    pub log_soft: Vec<usize>,
}

#[derive(Debug)]
enum Reject {
    Over(Refusal),
    Bad,
}

/// Why a request was not admitted against its budgets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReserved {
    /// A hard budget has no room.
    Over(Refusal),
    /// A budget's record could not be read or changed (damaged, contended
    /// past every retry, or the host refused): nothing is admitted
    /// unreserved.
    Unavailable { budget: usize },
}

/// Reserves `estimate` against every budget in `applicable`, refusing when a
/// hard budget's `spent + reserved + estimate` would pass its limit, or when
/// a budget's record cannot be updated. On a refusal nothing stays reserved.
/// Each amount expires after the budget's reservation TTL unless settled or
/// released first.
pub fn reserve(
    store: &dyn Store,
    budgets: &[Budget],
    applicable: &[usize],
    estimate: Decimal,
    now_ms: u64,
) -> Result<Admitted, NotReserved> {
    let mut admitted = Admitted::default();
    for &i in applicable {
        let Some(b) = budgets.get(i) else { continue };
        let (r, _) = update(store, &b.record_name, |cur| {
            let mut rec = read(cur).map_err(|_| Reject::Bad)?.current(b, now_ms);
            let limit = rec.limit(b);
            let over = rec.would_pass(b, estimate);
            if over && b.enforcement == Enforcement::Hard {
                return Err(Reject::Over(Refusal {
                    budget: i,
                    spent: rec.total(),
                    reserved: rec.reserved,
                    limit,
                    estimate,
                    resets_at_ms: b.resets_at(now_ms),
                }));
            }
            let log_now = over && rec.soft_logged_window != rec.window_start_ms.wrapping_add(1);
            if log_now {
                // Stored +1 so that window 0 (totals) is distinct from "never".
                rec.soft_logged_window = rec.window_start_ms.wrapping_add(1);
            }
            let bucket = b.bucket_of(now_ms);
            if !rec.hold(estimate, bucket) {
                return Err(Reject::Bad);
            }
            Ok(((rec.window_start_ms, bucket, over, log_now), rec.encode()))
        });
        match r {
            Ok((window_start_ms, bucket, over, log_now)) => {
                admitted.held.0.push(Held { budget: i, window_start_ms, bucket, amount: estimate });
                if over {
                    admitted.over_soft.push(i);
                }
                if log_now {
                    admitted.log_soft.push(i);
                }
            }
            Err(UpdateError::Rejected(Reject::Over(refusal))) => {
                count_refusal(store, b, now_ms);
                admitted.held.release(store, budgets, now_ms);
                return Err(NotReserved::Over(refusal));
            }
            Err(e) => {
                // Fail closed: a request is never admitted unreserved.
                log::warn!("budget {}: reservation refused, record not updatable ({e:?})", b.id);
                admitted.held.release(store, budgets, now_ms);
                return Err(NotReserved::Unavailable { budget: i });
            }
        }
    }
    Ok(admitted)
}

fn count_refusal(store: &dyn Store, b: &Budget, now_ms: u64) {
    let _ = update(store, &b.record_name, |cur| {
        let mut rec = read(cur)?.current(b, now_ms);
        rec.refused += 1;
        Ok::<_, BadRecord>(((), rec.encode()))
    });
}

/// A budget as a settlement left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub budget: usize,
    /// This instance's spend in the window.
    pub spent: Decimal,
    /// The spend alerts compare with the limit: the fleet's in fleet mode.
    pub total: Decimal,
    pub limit: Decimal,
    pub window_start_ms: u64,
    /// The alert thresholds this settlement crossed first (bit `i`:
    /// `Budget::alerts[i]`): nobody else, on any worker, got them.
    pub crossed: u32,
}

/// Replaces each reservation with the actual cost; returns each budget's
/// state after the change.
pub fn settle(store: &dyn Store, budgets: &[Budget], held: &[Held], actual: Decimal, now_ms: u64) -> Vec<Settled> {
    held.iter().filter_map(|h| adjust(store, budgets, h, Some(actual), now_ms)).collect()
}

/// Marks the thresholds of `budget` the record's spend has reached and no
/// one has claimed yet (bit `i`: `budget.alerts[i]`) and returns them.
#[inline(never)]
fn claim_alerts(rec: &mut BudgetRecord, budget: &Budget) -> u32 {
    let (total, limit) = (rec.total(), rec.limit(budget));
    if budget.alerts.is_empty() || limit <= Decimal::ZERO {
        return 0;
    }
    let reached = budget.alerts.iter().take(MAX_ALERTS).enumerate().fold(0, |bits, (i, t)| {
        if limit.checked_mul(*t).is_some_and(|at| total >= at) {
            bits | (1 << i)
        } else {
            bits
        }
    });
    let crossed = reached & !rec.alerted;
    rec.alerted |= crossed;
    crossed
}

#[inline(never)]
fn settled(rec: &BudgetRecord, b: &Budget, budget: usize, crossed: u32) -> Settled {
    Settled {
        budget,
        spent: rec.spent,
        total: rec.total(),
        limit: rec.limit(b),
        window_start_ms: rec.window_start_ms,
        crossed,
    }
}

/// Gives the reservations back (upstream failed, client went away).
pub fn release(store: &dyn Store, budgets: &[Budget], held: &[Held], now_ms: u64) {
    for h in held {
        adjust(store, budgets, h, None, now_ms);
    }
}

fn adjust(store: &dyn Store, budgets: &[Budget], h: &Held, actual: Option<Decimal>, now_ms: u64) -> Option<Settled> {
    let b = budgets.get(h.budget)?;
    let (r, _) = update(store, &b.record_name, |cur| {
        let mut rec = read(cur)?.current(b, now_ms);
        // A reservation from a window that has since rolled over was
        // cleared with it; the spend lands in the window it happened in.
        if rec.window_start_ms == h.window_start_ms {
            rec.unhold(h.amount, h.bucket);
        }
        let mut crossed = 0;
        if let Some(a) = actual {
            rec.spent += a;
            rec.requests += 1;
            rec.count_burn(crate::metrics::micros(a), now_ms);
            // In the same swap: the alerts are claimed with the spend.
            crossed = claim_alerts(&mut rec, b);
        }
        Ok::<_, BadRecord>((settled(&rec, b, h.budget, crossed), rec.encode()))
    });
    match r {
        Ok(settled) => Some(settled),
        Err(e) => {
            log::warn!("budget {}: true-up not recorded ({e:?})", b.id);
            None
        }
    }
}

/// Drops the reservations of `budget` that are past their deadline (the
/// tick calls it, so they go even when no request touches the budget);
/// returns the record as it is now.
pub fn expire(store: &dyn Store, budget: &Budget, now_ms: u64) -> BudgetRecord {
    let known = load_raw(store, budget);
    if !known.has_expired(budget, now_ms) {
        return known.current(budget, now_ms);
    }
    let (r, _) = update(store, &budget.record_name, |cur| {
        let rec = read(cur)?.current(budget, now_ms);
        Ok::<_, BadRecord>((rec, rec.encode()))
    });
    match r {
        Ok(rec) => {
            log::info!("budget {}: {} reservations expired unsettled in this window", budget.id, rec.expired);
            rec
        }
        Err(e) => {
            log::warn!("budget {}: expired reservations not dropped ({e:?})", budget.id);
            known.current(budget, now_ms)
        }
    }
}

fn load_raw(store: &dyn Store, budget: &Budget) -> BudgetRecord {
    read(store.value(&budget.record_name).as_deref()).unwrap_or_default()
}

/// During a stream whose running cost has passed its reservation by
/// `excess`: the first hard budget among `held` that the excess takes past
/// its limit, if any.
pub fn crossed(store: &dyn Store, budgets: &[Budget], held: &[Held], excess: Decimal, now_ms: u64) -> Option<usize> {
    held.iter().map(|h| h.budget).find(|&i| {
        budgets
            .get(i)
            .is_some_and(|b| b.enforcement == Enforcement::Hard && { load(store, b, now_ms).would_pass(b, excess) })
    })
}

/// Fleet mode: records what the other instances spent in `window_ms`.
pub fn set_fleet_spent(store: &dyn Store, budget: &Budget, window_ms: u64, others: Decimal, now_ms: u64) {
    let known = load(store, budget, now_ms);
    if (known.fleet_window_ms, known.fleet_spent) == (window_ms, others) {
        // Nothing new: no write, no CAS against requests.
        return;
    }
    let (r, _) = update(store, &budget.record_name, |cur| {
        let mut rec = read(cur)?.current(budget, now_ms);
        rec.fleet_spent = others;
        rec.fleet_window_ms = window_ms;
        Ok::<_, BadRecord>(((), rec.encode()))
    });
    if let Err(e) = r {
        log::warn!("budget {}: fleet spend not recorded ({e:?})", budget.id);
    }
}

/// Fleet mode: limits (or, with `None`, stops limiting) this instance's own
/// spend to `share` of each budget while etcd cannot be reached.
pub fn set_local_share(store: &dyn Store, budget: &Budget, share: Option<Decimal>, now_ms: u64) {
    let (r, _) = update(store, &budget.record_name, |cur| {
        let mut rec = read(cur)?.current(budget, now_ms);
        rec.local_share = share;
        Ok::<_, BadRecord>(((), rec.encode()))
    });
    if let Err(e) = r {
        log::warn!("budget {}: local share not recorded ({e:?})", budget.id);
    }
}

/// Sets (or, with `None`, clears) a budget's limit override.
pub fn set_limit(store: &dyn Store, budget: &Budget, limit: Option<Decimal>, now_ms: u64) -> Option<BudgetRecord> {
    let (r, _) = update(store, &budget.record_name, |cur| {
        let mut rec = read(cur)?.current(budget, now_ms);
        rec.limit_override = limit;
        Ok::<_, BadRecord>((rec, rec.encode()))
    });
    r.ok()
}

/// Rounds an amount for display, keeping up to 10 decimal places.
pub fn show(d: Decimal) -> String {
    d.round_dp(10).normalize().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FakeStore;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn price() -> Price {
        Price { input: dec("2.50"), output: dec("10.00"), cached_input: dec("1.25"), per_request: None }
    }

    fn usage(input: u64, output: u64, cached: u64) -> Usage {
        Usage { input, output, total: input + output, cached_input: cached, reasoning: 0 }
    }

    #[test]
    fn cost_is_usage_times_price_exactly() {
        let c = cost(&usage(1000, 500, 0), Some(&price()), &KeyPricing::default());
        assert_eq!(c, Some(dec("0.0075")));
        let c = cost(&usage(1000, 500, 400), Some(&price()), &KeyPricing::default());
        assert_eq!(c, Some(dec("0.007")), "400 cached at half price");
        // 0.1 + 0.2 style sums stay exact.
        let one = cost(&usage(1, 0, 0), Some(&price()), &KeyPricing::default()).unwrap_or_else(|| panic!("no cost"));
        let mut sum = Decimal::ZERO;
        for _ in 0..1_000_000 {
            sum += one;
        }
        assert_eq!(sum, dec("2.5"));
    }

    #[test]
    fn key_overrides_win_over_the_table() {
        let flat = KeyPricing { cost_per_1k: Some(dec("0.002")), multiplier: None };
        assert_eq!(cost(&usage(1000, 500, 0), Some(&price()), &flat), Some(dec("0.003")));
        assert_eq!(cost(&usage(1000, 500, 0), None, &flat), Some(dec("0.003")));
        let discounted = KeyPricing { cost_per_1k: None, multiplier: Some(dec("0.8")) };
        assert_eq!(cost(&usage(1000, 500, 0), Some(&price()), &discounted), Some(dec("0.006")));
        assert_eq!(cost(&usage(1, 1, 0), None, &KeyPricing::default()), None);
    }

    #[test]
    fn a_per_request_price_is_the_cost_of_any_answer_times_the_keys_multiplier() {
        let p = Price { per_request: Some(dec("0.04")), ..Price::default() };
        assert_eq!(cost(&usage(1000, 500, 0), Some(&p), &KeyPricing::default()), Some(dec("0.04")));
        assert_eq!(cost(&Usage::default(), Some(&p), &KeyPricing::default()), Some(dec("0.04")));
        let half = KeyPricing { cost_per_1k: Some(dec("9")), multiplier: Some(dec("0.5")) };
        assert_eq!(cost(&usage(1000, 0, 0), Some(&p), &half), Some(dec("0.02")), "not a token price");
        assert_eq!(estimate(4000, 4096, Some(&p), &KeyPricing::default()), dec("0.04"));
    }

    #[test]
    fn estimates_are_upper_bounds_over_the_keys_that_may_serve() {
        let p = price();
        let flat = KeyPricing { cost_per_1k: Some(dec("0.1")), multiplier: None };
        let half = KeyPricing { cost_per_1k: None, multiplier: Some(dec("0.5")) };
        assert_eq!(estimate(1000, 1000, Some(&p), &KeyPricing::default()), dec("0.0125"));
        assert_eq!(worst_estimate(1000, 1000, Some(&p), &[half, flat]), dec("0.2"));
        assert_eq!(worst_estimate(1000, 1000, None, &[]), Decimal::ZERO);
        let actual = cost(&usage(900, 300, 100), Some(&p), &half).unwrap_or_else(|| panic!("no cost"));
        assert!(actual <= estimate(900, 1000, Some(&p), &half));
    }

    #[test]
    fn price_table_matches_exact_names_then_the_longest_prefix() {
        let mut t = PriceTable::default();
        t.insert("gpt-4o*", price());
        t.insert("gpt-4o-mini*", Price { input: dec("0.15"), ..Price::default() });
        t.insert("gpt-4o-mini-tts", Price { input: dec("9"), ..Price::default() });
        assert_eq!(t.lookup("gpt-4o-2024-08-06").map(|p| p.input), Some(dec("2.50")));
        assert_eq!(t.lookup("gpt-4o-mini-2024-07-18").map(|p| p.input), Some(dec("0.15")));
        assert_eq!(t.lookup("gpt-4o-mini-tts").map(|p| p.input), Some(dec("9")));
        assert_eq!(t.lookup("o1"), None);
        assert_eq!(t.label(Some("gpt-4o-mini-tts")), "gpt-4o-mini-tts");
        assert_eq!(t.label(Some("gpt-4o-mini-2024-07-18")), "gpt-4o-mini*");
        assert_eq!((t.label(Some("o1")), t.label(None)), ("other".to_string(), "other".to_string()));
        t.insert("claude-3.5 sonnet:beta", Price::default());
        assert_eq!(t.label(Some("claude-3.5 sonnet:beta")), "claude-3.5_sonnet_beta");
    }

    fn budget(limit: &str, enforcement: Enforcement, window: Option<Window>) -> Budget {
        Budget {
            id: "b".into(),
            scope: Scope::Global,
            window,
            limit: dec(limit),
            enforcement,
            record_name: "akr.v1.budget.b".into(),
            reservation_ttl_ms: DEFAULT_RESERVATION_TTL_MS,
            alerts: Vec::new(),
        }
    }

    fn sample_record() -> BudgetRecord {
        let mut pending = [Pending::default(); PENDING_SLOTS];
        pending[0] = Pending { bucket: 7, amount: dec("0.5"), count: 2 };
        BudgetRecord {
            window_start_ms: 5,
            spent: dec("1.0000000001"),
            reserved: dec("0.5"),
            pending,
            expired: 3,
            requests: 7,
            refused: 8,
            soft_logged_window: 9,
            limit_override: Some(dec("42.5")),
            fleet_spent: dec("3.25"),
            fleet_window_ms: 5,
            local_share: Some(dec("0.5")),
            burn_start_ms: 600_000,
            burn_since_ms: 0,
            burn_micros: 250_000,
            burn_prev_micros: 0,
            alerted: 5,
        }
    }

    /// `sample_record()`'s version 2 fields: what shared data held before
    /// reservations expired.
    const SAMPLE_V2: &str = concat!(
        "0201",                             // version 2, limit override set
        "0500000000000000",                 // window_start_ms
        "00000a0001e40b540200000000000000", // spent
        "00000100050000000000000000000000", // reserved
        "0700000000000000",                 // requests
        "0800000000000000",                 // refused
        "0900000000000000",                 // soft_logged_window
        "00000100a90100000000000000000000", // limit_override
        "00000200450100000000000000000000", // fleet_spent
        "0500000000000000",                 // fleet_window_ms
        "01",                               // local_share set
        "00000100050000000000000000000000", // local_share
    );

    /// The expiry buckets and count that version 3 adds.
    const SAMPLE_V3_TAIL: &str = concat!(
        "0700000000000000",
        "00000100050000000000000000000000",
        "02000000", // slot 0: bucket 7, 0.5, 2 reservations
        "00000000000000000000000000000000000000000000000000000000",
        "00000000000000000000000000000000000000000000000000000000",
        "00000000000000000000000000000000000000000000000000000000",
        "00000000000000000000000000000000000000000000000000000000",
        "00000000000000000000000000000000000000000000000000000000", // slots 1-5 empty
        "0300000000000000",                                         // expired
    );

    /// The burn-rate buckets that version 4 adds.
    const SAMPLE_V4_TAIL: &str = concat!(
        "c027090000000000", // burn_start_ms 600,000
        "0000000000000000", // burn_since_ms
        "90d0030000000000", // burn_micros 250,000
        "0000000000000000", // burn_prev_micros
    );

    #[test]
    fn record_bytes_are_pinned() {
        // Version 4 adds the burn-rate buckets and the alert thresholds crossed (0b101).
        let v4 = format!("04{}{SAMPLE_V3_TAIL}{SAMPLE_V4_TAIL}05000000", &SAMPLE_V2[2..]);
        let b = crate::codec::pinned(&sample_record().encode(), &v4);
        assert_eq!(BudgetRecord::decode(&b), Ok(sample_record()));
        // Version 3: no burn-rate buckets, none crossed.
        let v3 = crate::codec::unhex(&format!("03{}{SAMPLE_V3_TAIL}", &SAMPLE_V2[2..]));
        let old = BudgetRecord { burn_start_ms: 0, burn_micros: 0, alerted: 0, ..sample_record() };
        assert_eq!(BudgetRecord::decode(&v3), Ok(old));
    }

    #[test]
    fn records_round_trip_and_reject_damage() {
        let r = sample_record();
        assert_eq!(BudgetRecord::decode(&r.encode()), Ok(r));
        // A version 2 record (before expiry) holds its reservations in a
        // bucket that expires at the next update.
        let v2 = crate::codec::unhex(SAMPLE_V2);
        let mut old = [Pending::default(); PENDING_SLOTS];
        old[0] = Pending { bucket: 1, amount: dec("0.5"), count: 1 };
        let as_v2 = BudgetRecord { pending: old, expired: 0, burn_start_ms: 0, burn_micros: 0, alerted: 0, ..r };
        assert_eq!(BudgetRecord::decode(&v2), Ok(as_v2));
        // A version 1 record (before fleet mode) reads with no fleet state.
        let mut v1 = v2.clone();
        v1[0] = 1;
        v1.truncate(V1_LEN);
        let plain = BudgetRecord { fleet_spent: Decimal::ZERO, fleet_window_ms: 0, local_share: None, ..as_v2 };
        assert_eq!(BudgetRecord::decode(&v1), Ok(plain));
        assert_eq!(BudgetRecord::decode(&BudgetRecord::default().encode()), Ok(BudgetRecord::default()));
        for cut in 0..BudgetRecord::LEN {
            assert_eq!(BudgetRecord::decode(&r.encode()[..cut]), Err(BadRecord), "cut at {cut}");
        }
    }

    #[test]
    fn a_reservation_never_settled_expires_after_its_ttl_and_is_counted() {
        let s = FakeStore::new();
        let mut b = budget("1.00", Enforcement::Hard, Some(Window::Day));
        b.reservation_ttl_ms = 60_000;
        let bs = vec![b];
        let lost = reserve(&s, &bs, &[0], dec("0.40"), 1_000).unwrap_or_else(|e| panic!("{e:?}"));
        let kept = reserve(&s, &bs, &[0], dec("0.30"), 30_000).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(load(&s, &bs[0], 60_000).reserved, dec("0.70"), "held until the deadline");
        // The first one's bucket ends within 1.25 TTL of its start; the
        // second's later.
        let r = expire(&s, &bs[0], 1_000 + 75_000);
        assert_eq!((r.reserved, r.expired), (dec("0.30"), 1));
        assert_eq!(load(&s, &bs[0], 1_000 + 75_000).reserved, dec("0.30"), "written, not just computed");
        // Its late release changes nothing; the other settles normally.
        drop(lost.over_soft);
        lost.held.release(&s, &bs, 80_000);
        let spent = kept.held.settle(&s, &bs, dec("0.25"), 80_000);
        assert_eq!(spent.iter().map(|s| (s.budget, s.spent)).collect::<Vec<_>>(), vec![(0, dec("0.25"))]);
        let r = load(&s, &bs[0], 80_000);
        assert_eq!((r.spent, r.reserved, r.expired), (dec("0.25"), Decimal::ZERO, 1));
        assert!(r.pending.iter().all(|p| *p == Pending::default()));
    }

    /// A store where another worker reserves on the same budget between this
    /// worker's read and its write, once.
    struct OtherWorkerBetween<'a> {
        inner: &'a FakeStore,
        budgets: &'a [Budget],
        pending: std::cell::Cell<bool>,
    }

    impl Store for OtherWorkerBetween<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), crate::store::ReadError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), crate::store::SetError> {
            if self.pending.replace(false) {
                assert!(reserve(self.inner, self.budgets, &[0], dec("0.40"), 0).is_ok());
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn two_first_reservations_on_a_seeded_record_both_count_but_on_an_absent_one_one_is_lost() {
        let bs = vec![budget("1.00", Enforcement::Hard, Some(Window::Day))];
        // Absent: the host inserts whatever the cas, so the other worker's
        // reservation is overwritten. This is why records are seeded.
        let s = FakeStore::new();
        let racy = OtherWorkerBetween { inner: &s, budgets: &bs, pending: true.into() };
        assert!(reserve(&racy, &bs, &[0], dec("0.40"), 0).is_ok());
        assert_eq!(load(&s, &bs[0], 0).reserved, dec("0.40"), "one of two reservations lost");
        // Seeded: the second write conflicts, re-reads and adds its own.
        let s = FakeStore::new();
        assert!(crate::store::seed(&s, &bs[0].record_name, &BudgetRecord::default().encode()).is_ok());
        let racy = OtherWorkerBetween { inner: &s, budgets: &bs, pending: true.into() };
        assert!(reserve(&racy, &bs, &[0], dec("0.40"), 0).is_ok());
        assert_eq!(load(&s, &bs[0], 0).reserved, dec("0.80"));
    }

    #[test]
    fn an_unreadable_budget_record_refuses_instead_of_admitting_unreserved() {
        let s = FakeStore::new();
        let bs = vec![budget("1.00", Enforcement::Hard, Some(Window::Day))];
        assert!(s.set(&bs[0].record_name, b"\x09garbage", None).is_ok());
        assert_eq!(reserve(&s, &bs, &[0], dec("0.10"), 0), Err(NotReserved::Unavailable { budget: 0 }));
    }

    #[test]
    fn fleet_spend_of_the_current_window_counts_against_the_limit() {
        let b = budget("1.00", Enforcement::Hard, Some(Window::Day));
        let mut r = BudgetRecord { window_start_ms: 0, spent: dec("0.30"), ..BudgetRecord::default() };
        assert!(!r.would_pass(&b, dec("0.60")));
        r.fleet_spent = dec("0.20");
        assert!(r.would_pass(&b, dec("0.60")), "0.30 + 0.20 by others + 0.60 > 1.00");
        // Others' spend from another window does not count.
        r.fleet_window_ms = 86_400_000;
        assert!(!r.would_pass(&b, dec("0.60")));
    }

    #[test]
    fn without_etcd_an_instance_keeps_to_its_share_of_the_limit() {
        let b = budget("1.00", Enforcement::Hard, Some(Window::Day));
        let r = BudgetRecord { spent: dec("0.30"), local_share: Some(dec("0.5")), ..BudgetRecord::default() };
        assert!(!r.would_pass(&b, dec("0.20")));
        assert!(r.would_pass(&b, dec("0.21")), "0.51 of its own is over half of 1.00");
    }

    #[test]
    fn hard_budget_refuses_when_spent_plus_reserved_plus_estimate_would_pass_the_limit() {
        let s = FakeStore::new();
        let bs = vec![budget("1.00", Enforcement::Hard, Some(Window::Day))];
        let a = reserve(&s, &bs, &[0], dec("0.40"), 0);
        let b = reserve(&s, &bs, &[0], dec("0.40"), 0);
        assert!(a.is_ok() && b.is_ok());
        let refused = reserve(&s, &bs, &[0], dec("0.40"), 0);
        let Err(NotReserved::Over(r)) = refused else { panic!("admitted past the limit: {refused:?}") };
        assert_eq!((r.reserved, r.limit, r.resets_at_ms), (dec("0.80"), dec("1.00"), Some(86_400_000)));
        assert_eq!(load(&s, &bs[0], 0).refused, 1);
        // Exactly up to the limit is allowed.
        assert!(reserve(&s, &bs, &[0], dec("0.20"), 0).is_ok());
    }

    #[test]
    fn true_up_replaces_the_reservation_with_the_actual_cost() {
        let s = FakeStore::new();
        let bs = vec![budget("1.00", Enforcement::Hard, None)];
        let a = reserve(&s, &bs, &[0], dec("0.40"), 0).unwrap_or_else(|r| panic!("refused: {r:?}"));
        settle(&s, &bs, a.held.held(), dec("0.1234"), 10);
        let rec = load(&s, &bs[0], 10);
        assert_eq!((rec.spent, rec.reserved, rec.requests), (dec("0.1234"), Decimal::ZERO, 1));
        let b = reserve(&s, &bs, &[0], dec("0.5"), 10).unwrap_or_else(|r| panic!("refused: {r:?}"));
        release(&s, &bs, b.held.held(), 20);
        let rec = load(&s, &bs[0], 20);
        assert_eq!((rec.spent, rec.reserved, rec.requests), (dec("0.1234"), Decimal::ZERO, 1));
    }

    #[test]
    fn settled_spend_gives_the_burn_rate_and_the_runway_of_what_remains() {
        let s = FakeStore::new();
        let bs = vec![budget("10.00", Enforcement::Hard, Some(Window::Month))];
        let t0 = 20_000 * 86_400_000 + 3_600_000;
        // 0.10 a second for 20 s (21 true-ups, the first at the start).
        for i in 0..=20 {
            let a = reserve(&s, &bs, &[0], dec("0.2"), t0 + i * 1000).unwrap_or_else(|r| panic!("{r:?}"));
            settle(&s, &bs, a.held.held(), dec("0.1"), t0 + i * 1000);
        }
        let rec = load(&s, &bs[0], t0 + 20_000);
        assert_eq!(rec.remaining(&bs[0]), dec("7.9"));
        let f = rec.forecast(&bs[0], t0 + 20_000);
        // 2.10 over 20 s: 378 an hour; 7.90 left lasts 75.2 s.
        assert!(f.spend_per_hour.is_some_and(|h| (h - 378.0).abs() < 1e-6), "{f:?}");
        assert_eq!(f.runway_ms, Some(75_238));
        assert!(f.runs_out(t0 + 20_000) && f.gauge(t0 + 20_000) == 75);
        // Idle for two buckets: the rate is 0 and it lasts.
        let later = load(&s, &bs[0], t0 + 1_300_000).forecast(&bs[0], t0 + 1_300_000);
        assert_eq!((later.spend_per_hour, later.runway_ms), (Some(0.0), None));
        assert_eq!(later.gauge(t0 + 1_300_000), crate::forecast::LASTS);
    }

    #[test]
    fn a_refusal_releases_what_other_budgets_already_held() {
        let s = FakeStore::new();
        let mut tight = budget("0.10", Enforcement::Hard, None);
        tight.record_name = "akr.v1.budget.tight".into();
        let bs = vec![budget("1.00", Enforcement::Hard, None), tight];
        assert!(reserve(&s, &bs, &[0, 1], dec("0.50"), 0).is_err());
        assert_eq!(load(&s, &bs[0], 0).reserved, Decimal::ZERO);
    }

    #[test]
    fn soft_budget_admits_flags_and_logs_once_per_window() {
        let s = FakeStore::new();
        let bs = vec![budget("0.10", Enforcement::Soft, Some(Window::Minute))];
        let a = reserve(&s, &bs, &[0], dec("0.20"), 0).unwrap_or_else(|r| panic!("refused: {r:?}"));
        assert_eq!((a.over_soft.clone(), a.log_soft.clone()), (vec![0], vec![0]));
        let b = reserve(&s, &bs, &[0], dec("0.20"), 1).unwrap_or_else(|r| panic!("refused: {r:?}"));
        assert_eq!((b.over_soft, b.log_soft), (vec![0], vec![]), "logged once per window");
        let c = reserve(&s, &bs, &[0], dec("0.20"), 60_000).unwrap_or_else(|r| panic!("refused: {r:?}"));
        assert_eq!(c.log_soft, vec![0], "a new window logs again");
    }

    #[test]
    fn windows_roll_over_at_utc_boundaries_and_late_true_ups_land_in_the_new_window() {
        let s = FakeStore::new();
        let bs = vec![budget("1.00", Enforcement::Hard, Some(Window::Hour))];
        let a = reserve(&s, &bs, &[0], dec("0.90"), 3_599_000).unwrap_or_else(|r| panic!("refused: {r:?}"));
        assert!(reserve(&s, &bs, &[0], dec("0.20"), 3_599_500).is_err());
        // The hour turns while the request is in flight.
        assert!(reserve(&s, &bs, &[0], dec("0.20"), 3_600_000).is_ok());
        settle(&s, &bs, a.held.held(), dec("0.30"), 3_600_100);
        let rec = load(&s, &bs[0], 3_600_100);
        assert_eq!((rec.spent, rec.reserved), (dec("0.30"), dec("0.20")));
    }

    #[test]
    fn a_stream_running_past_its_reservation_crosses_a_hard_budget() {
        let s = FakeStore::new();
        let bs = vec![budget("1.00", Enforcement::Hard, None)];
        let a = reserve(&s, &bs, &[0], dec("0.90"), 0).unwrap_or_else(|r| panic!("refused: {r:?}"));
        assert_eq!(crossed(&s, &bs, a.held.held(), dec("0.05"), 0), None);
        assert_eq!(crossed(&s, &bs, a.held.held(), dec("0.11"), 0), Some(0));
    }

    #[test]
    fn admin_limit_override_is_enforced() {
        let s = FakeStore::new();
        let bs = vec![budget("1.00", Enforcement::Hard, None)];
        assert!(set_limit(&s, &bs[0], Some(dec("0.05")), 0).is_some());
        assert!(reserve(&s, &bs, &[0], dec("0.10"), 0).is_err());
        assert!(set_limit(&s, &bs[0], None, 0).is_some());
        assert!(reserve(&s, &bs, &[0], dec("0.10"), 0).is_ok());
    }

    #[test]
    fn each_alert_threshold_is_crossed_once_per_window_in_the_charging_swap() {
        let s = FakeStore::new();
        let mut b = budget("1.00", Enforcement::Soft, Some(Window::Hour));
        b.alerts = vec![dec("0.5"), dec("0.8"), dec("1")];
        let bs = vec![b];
        let charge = |amount: &str, now: u64| {
            let a = reserve(&s, &bs, &[0], dec("0.01"), now).unwrap_or_else(|r| panic!("refused: {r:?}"));
            a.held.settle(&s, &bs, dec(amount), now).iter().map(|x| x.crossed).collect::<Vec<u32>>()
        };
        assert_eq!(charge("0.49", 0), vec![0]);
        assert_eq!(charge("0.01", 1), vec![0b001], "0.50 reaches the first");
        assert_eq!(charge("0.10", 2), vec![0]);
        assert_eq!(charge("0.45", 3), vec![0b110], "one charge past two thresholds crosses both");
        assert_eq!(charge("1", 4), vec![0], "none twice");
        assert_eq!(load(&s, &bs[0], 5).alerted, 0b111);
        assert_eq!(charge("0.60", 3_600_000), vec![0b001], "a new window crosses them again");
        // A release charges nothing and crosses nothing.
        let a = reserve(&s, &bs, &[0], dec("5"), 3_600_001).unwrap_or_else(|r| panic!("refused: {r:?}"));
        a.held.release(&s, &bs, 3_600_001);
        assert_eq!(load(&s, &bs[0], 3_600_001).alerted, 0b001);
    }

    #[test]
    fn amounts_are_shown_without_trailing_noise() {
        assert_eq!(show(dec("0.007500")), "0.0075");
        assert_eq!(show(dec("3")), "3");
    }
}
