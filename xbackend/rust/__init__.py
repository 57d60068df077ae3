"""The Rust stack: candle debug logs, replay of a trace through candle's sampler, app sessions."""
