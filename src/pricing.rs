//! What a request cost: USD per million tokens of each kind, by upstream model glob
//! (`pricing:`, then the shipped defaults).

use regex::Regex;

use crate::config::PriceConfig;
use crate::dispatch::Usage;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_write: f64,
    pub cache_read: f64,
}

impl Price {
    /// The cost of `usage` at this price. Anthropic's `input_tokens` counts only the input that
    /// was neither written to nor read from the prompt cache, so the four kinds add up.
    pub fn cost(&self, usage: &Usage) -> f64 {
        (usage.input_tokens as f64 * self.input
            + usage.output_tokens as f64 * self.output
            + usage.cache_creation_input_tokens as f64 * self.cache_write
            + usage.cache_read_input_tokens as f64 * self.cache_read)
            / 1_000_000.0
    }
}

/// List prices of Claude models (USD per million tokens: input, output, 5-minute cache write,
/// cache read), from Anthropic's price list. Models not listed here have no default price: add
/// them under `pricing:`.
pub const DEFAULTS: &[(&str, Price)] = &[
    ("claude-opus-4-5*", price(5.0, 25.0)),
    ("claude-opus-4-1*", price(15.0, 75.0)),
    ("claude-opus-4-2025*", price(15.0, 75.0)),
    ("claude-opus-4-0*", price(15.0, 75.0)),
    ("claude-opus-4", price(15.0, 75.0)),
    ("claude-sonnet-4*", price(3.0, 15.0)),
    ("claude-3-7-sonnet*", price(3.0, 15.0)),
    ("claude-3-5-sonnet*", price(3.0, 15.0)),
    ("claude-haiku-4-5*", price(1.0, 5.0)),
    ("claude-3-5-haiku*", price(0.8, 4.0)),
    ("claude-3-haiku*", price(0.25, 1.25)),
];

/// Anthropic's rule: a cache write costs 1.25 times the input price, a cache read a tenth.
const fn price(input: f64, output: f64) -> Price {
    Price {
        input,
        output,
        cache_write: input * 1.25,
        cache_read: input * 0.1,
    }
}

/// The compiled price table of one configuration.
#[derive(Debug)]
pub struct Pricing {
    /// The configured entries first (in file order), then the defaults.
    entries: Vec<(Regex, Price)>,
}

impl Pricing {
    pub fn new(configured: &[PriceConfig]) -> Self {
        let configured = configured.iter().map(|c| {
            (
                c.pattern.as_str(),
                Price {
                    input: c.input,
                    output: c.output,
                    cache_write: c.cache_write,
                    cache_read: c.cache_read,
                },
            )
        });
        let entries = configured
            .chain(DEFAULTS.iter().map(|(p, price)| (*p, *price)))
            .filter_map(|(pattern, price)| {
                Regex::new(&crate::routing::glob_pattern(pattern))
                    .ok()
                    .map(|re| (re, price))
            })
            .collect();
        Self { entries }
    }

    /// The price of an upstream model: the first entry whose glob matches it.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.entries
            .iter()
            .find(|(re, _)| re.is_match(model))
            .map(|(_, p)| *p)
    }

    /// What `usage` on `model` cost; `None` when the model has no price.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        self.price(model).map(|p| p.cost(usage))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, write: u64, read: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: write,
            cache_read_input_tokens: read,
        }
    }

    #[test]
    fn a_request_with_cache_tokens_costs_what_the_hand_computation_says() {
        let pricing = Pricing::new(&[]);
        // Sonnet 4.x: $3 in, $15 out, $3.75 cache write, $0.30 cache read per million.
        // 1,200 fresh input, 800 output, 10,000 written, 50,000 read:
        // 1200*3 + 800*15 + 10000*3.75 + 50000*0.30 = 3600 + 12000 + 37500 + 15000 = 68,100
        // millionths of a dollar.
        let cost = pricing
            .cost("claude-sonnet-4-6", &usage(1_200, 800, 10_000, 50_000))
            .unwrap();
        assert!((cost - 0.0681).abs() < 1e-12, "{cost}");
        // Haiku 4.5: $1 / $5 / $1.25 / $0.10.
        let cost = pricing
            .cost(
                "claude-haiku-4-5-20251001",
                &usage(1_000_000, 0, 0, 1_000_000),
            )
            .unwrap();
        assert!((cost - 1.1).abs() < 1e-12, "{cost}");
    }

    #[test]
    fn configured_prices_come_first_and_unknown_models_have_none() {
        let pricing = Pricing::new(&[
            PriceConfig {
                pattern: "deepseek/*".into(),
                input: 0.27,
                output: 1.10,
                cache_write: 0.27,
                cache_read: 0.07,
            },
            PriceConfig {
                pattern: "claude-sonnet-4-6".into(),
                input: 1.0,
                output: 2.0,
                cache_write: 0.0,
                cache_read: 0.0,
            },
        ]);
        assert_eq!(
            pricing.price("DeepSeek/deepseek-chat").unwrap().output,
            1.10
        );
        assert_eq!(pricing.price("claude-sonnet-4-6").unwrap().input, 1.0);
        assert_eq!(pricing.price("claude-sonnet-4-5").unwrap().input, 3.0);
        assert_eq!(
            pricing.price("claude-opus-4-1-20250805").unwrap().output,
            75.0
        );
        assert_eq!(
            pricing.price("claude-opus-4-5-20251101").unwrap().output,
            25.0
        );
        assert!(pricing.price("gpt-5").is_none());
        assert!(pricing.cost("gpt-5", &usage(1, 1, 1, 1)).is_none());
    }
}
