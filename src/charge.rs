//! What an attempt that got a 2xx answer is charged. The rules, in order:
//!
//! 1. **`per_request`**: a model priced per request costs exactly its price
//!    (times the key's `price_multiplier`) for every 2xx, whatever it reports.
//! 2. **`usage`**: an answer whose end was seen, with usage: the provider's
//!    usage times the price.
//! 3. **`reservation`**: an answer whose end was seen, without usage (a
//!    background response, speech, images, a stream without its usage
//!    event): the admission upper bound for the key that served it.
//! 4. **`partial`**: an answer cut short (a reset, a timeout, the caller
//!    gone) after some of it reached the caller. A stream is charged its
//!    input tokens (the provider's, when it reported them early, as
//!    Anthropic's `message_start` does, else the admission estimate of the
//!    prompt) plus its output tokens so far: the characters of output text
//!    in the events that passed ([`crate::usage::output_chars`]) divided by
//!    4, rounded up, or the provider's own running count when it reported a
//!    larger one (Gemini). Never more than the upper bound. A JSON answer is
//!    charged the upper bound: the provider generated it whole before
//!    sending it.
//!
//! ```
//! use apikeyrouter::budget::{KeyPricing, Price};
//! use apikeyrouter::charge::{charge, Answer, Basis};
//! use rust_decimal::Decimal;
//!
//! let price = Price { input: Decimal::from(1000), output: Decimal::from(2000), ..Price::default() };
//! // A stream cut after 10 characters of text: 300 prompt bytes estimated, 3 output tokens.
//! let cut = Answer { stream: true, output_chars: 10, ..Answer::default() };
//! let c = charge(&cut, (300, 4096), Some(&price), &KeyPricing::default());
//! assert_eq!((c.basis, c.tokens.input, c.tokens.output), (Basis::Partial, 300, 3));
//! assert_eq!(c.cost, Some(Decimal::new(306, 3)));
//! ```

use crate::budget::{cost, KeyPricing, Price};
use crate::usage::Usage;
use rust_decimal::Decimal;

/// How a charge was worked out: `charged` in access logs and decision
/// records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    Usage = 1,
    Partial = 2,
    Reservation = 3,
    PerRequest = 4,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Usage => "usage",
            Basis::Partial => "partial",
            Basis::Reservation => "reservation",
            Basis::PerRequest => "per_request",
        }
    }

    pub fn from_u8(b: u8) -> Option<Basis> {
        Some(match b {
            1 => Basis::Usage,
            2 => Basis::Partial,
            3 => Basis::Reservation,
            4 => Basis::PerRequest,
            _ => return None,
        })
    }
}

/// What an attempt saw of its 2xx answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answer {
    /// The provider's usage: of the whole answer, or of a stream cut short
    /// as far as it had reported it.
    pub usage: Option<Usage>,
    /// The answer's end was seen.
    pub complete: bool,
    /// An event stream, read as it passed (else a JSON or other body).
    pub stream: bool,
    /// Characters of output text in the stream's events that passed.
    pub output_chars: u64,
}

/// A charge: how it was worked out, the tokens it counts (client `tpm`,
/// access logs) and its cost (`None` when nothing prices the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub basis: Basis,
    pub tokens: Usage,
    pub cost: Option<Decimal>,
}

/// The charge for a 2xx answer served with `key`. `bound` is the admission
/// estimate: prompt tokens and the most output tokens the request allows.
pub fn charge(a: &Answer, bound: (u64, u64), price: Option<&Price>, key: &KeyPricing) -> Charge {
    let priced = |basis, tokens: Usage| Charge { basis, tokens, cost: cost(&tokens, price, key) };
    let (prompt, most) = bound;
    let upper = Usage { input: prompt, output: most, total: prompt.saturating_add(most), ..Usage::default() };
    if price.is_some_and(|p| p.per_request.is_some()) {
        return priced(Basis::PerRequest, a.usage.unwrap_or_default());
    }
    match a.usage {
        Some(u) if a.complete => priced(Basis::Usage, u),
        _ if a.complete => priced(Basis::Reservation, upper),
        early if a.stream => {
            let input = early.map_or(prompt, |u| u.input);
            let output = a.output_chars.div_ceil(4).max(early.map_or(0, |u| u.output));
            let cached_input = early.map_or(0, |u| u.cached_input);
            let tokens = Usage { input, output, total: input.saturating_add(output), cached_input, reasoning: 0 };
            let mut c = priced(Basis::Partial, tokens);
            c.cost = c.cost.map(|x| cost(&upper, price, key).map_or(x, |most| x.min(most)));
            c
        }
        _ => priced(Basis::Partial, upper),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price() -> Price {
        Price { input: Decimal::from(1000), output: Decimal::from(2000), ..Price::default() }
    }

    fn usage(input: u64, output: u64) -> Usage {
        Usage { input, output, total: input + output, ..Usage::default() }
    }

    fn of(a: Answer) -> Charge {
        charge(&a, (300, 100), Some(&price()), &KeyPricing::default())
    }

    #[test]
    fn a_whole_answer_with_usage_is_charged_its_usage() {
        let c = of(Answer { usage: Some(usage(12, 7)), complete: true, ..Answer::default() });
        assert_eq!((c.basis, c.tokens, c.cost), (Basis::Usage, usage(12, 7), Some(Decimal::new(26, 3))));
    }

    #[test]
    fn a_whole_answer_without_usage_is_charged_the_upper_bound() {
        for stream in [false, true] {
            let c = of(Answer { complete: true, stream, output_chars: 40, ..Answer::default() });
            // 300 x 0.001 + 100 x 0.002
            assert_eq!((c.basis, c.tokens, c.cost), (Basis::Reservation, usage(300, 100), Some(Decimal::new(5, 1))));
        }
    }

    #[test]
    fn a_stream_cut_short_is_charged_its_prompt_and_the_text_that_passed() {
        let c = of(Answer { stream: true, output_chars: 9, ..Answer::default() });
        assert_eq!((c.basis, c.tokens), (Basis::Partial, usage(300, 3)), "9 characters: 3 tokens");
        assert_eq!(c.cost, Some(Decimal::new(306, 3)));
        let none = of(Answer { stream: true, ..Answer::default() });
        assert_eq!(none.tokens, usage(300, 0), "headers only: the prompt");
    }

    #[test]
    fn early_provider_counts_replace_the_estimates_of_a_stream_cut_short() {
        // Anthropic's message_start: the real input, a placeholder output.
        let c = of(Answer { usage: Some(usage(25, 1)), stream: true, output_chars: 8, ..Answer::default() });
        assert_eq!(c.tokens, usage(25, 2));
        // Gemini's running count above the text estimate.
        let c = of(Answer { usage: Some(usage(25, 9)), stream: true, output_chars: 8, ..Answer::default() });
        assert_eq!(c.tokens, usage(25, 9));
    }

    #[test]
    fn a_partial_answer_never_costs_more_than_the_upper_bound() {
        let c = of(Answer { stream: true, output_chars: 4000, ..Answer::default() });
        assert_eq!((c.tokens.output, c.cost), (1000, Some(Decimal::new(5, 1))));
        let json = of(Answer::default());
        assert_eq!((json.basis, json.tokens, json.cost), (Basis::Partial, usage(300, 100), Some(Decimal::new(5, 1))));
    }

    #[test]
    fn a_model_priced_per_request_costs_its_price_for_any_2xx() {
        let p = Price { per_request: Some(Decimal::new(4, 2)), ..Price::default() };
        for a in [
            Answer { complete: true, ..Answer::default() },
            Answer { usage: Some(usage(900, 900)), complete: true, ..Answer::default() },
            Answer { stream: true, output_chars: 99, ..Answer::default() },
        ] {
            let c = charge(&a, (300, 100), Some(&p), &KeyPricing::default());
            assert_eq!((c.basis, c.cost), (Basis::PerRequest, Some(Decimal::new(4, 2))), "{a:?}");
        }
    }

    #[test]
    fn an_unpriced_model_is_charged_nothing_but_its_tokens_still_count() {
        let c = charge(
            &Answer { stream: true, output_chars: 8, ..Answer::default() },
            (300, 100),
            None,
            &KeyPricing::default(),
        );
        assert_eq!((c.tokens.total, c.cost), (302, None));
    }

    #[test]
    fn bases_round_trip_through_their_byte() {
        for b in [Basis::Usage, Basis::Partial, Basis::Reservation, Basis::PerRequest] {
            assert_eq!(Basis::from_u8(b as u8), Some(b));
        }
        assert_eq!(Basis::from_u8(0), None);
    }
}
