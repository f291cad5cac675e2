//! What the simulated sensors read: one value (or silence) per channel per
//! tick, as a pure function of the time since start and a seeded PRNG.

use super::rng::Rng;

/// Names, units, base values and noise of the default channels, in order;
/// channels past these are `ch3`, `ch4`, ... without a unit.
pub const DEFAULT_CHANNELS: [(&str, &str, f64, f64); 3] = [
    ("temperature", "degC", 21.5, 0.2),
    ("humidity", "%", 45.0, 1.0),
    ("pressure", "hPa", 1013.25, 0.5),
];

/// How the simulated values behave over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Every channel: its base value plus small uniform noise.
    Steady,
    /// Channel 0 follows a triangle wave from --ramp-low up to --ramp-high
    /// and back once per --ramp-period (no noise, so it crosses a threshold
    /// cleanly); the other channels are steady.
    Ramp,
    /// Steady, plus a one-tick spike on channel 0 (--spike-height added)
    /// every --spike-every seconds.
    Spikes,
    /// Steady, but channel 0 stops reporting after --silent-after seconds.
    Silent,
}

/// One simulated channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelSpec {
    /// Name in descriptors and text lines.
    pub name: String,
    /// Unit in descriptors (may be empty).
    pub unit: String,
    /// Value around which the channel reads.
    pub base: f64,
    /// Amplitude of the uniform noise added to `base`.
    pub noise: f64,
}

impl ChannelSpec {
    /// The default channel at `index`: see [`DEFAULT_CHANNELS`].
    pub fn default_for(index: usize) -> Self {
        match DEFAULT_CHANNELS.get(index) {
            Some(&(name, unit, base, noise)) => ChannelSpec::new(name, unit, base, noise),
            None => Self::named(index, &format!("ch{index}"), ""),
        }
    }

    /// A channel at `index` with the given name and unit and the base value
    /// and noise of the default channel at that index (`10 * index` and 0.1
    /// past the defaults).
    pub fn named(index: usize, name: &str, unit: &str) -> Self {
        let (base, noise) = match DEFAULT_CHANNELS.get(index) {
            Some(&(_, _, base, noise)) => (base, noise),
            None => (10.0 * index as f64, 0.1),
        };
        ChannelSpec::new(name, unit, base, noise)
    }

    fn new(name: &str, unit: &str, base: f64, noise: f64) -> Self {
        ChannelSpec {
            name: name.to_owned(),
            unit: unit.to_owned(),
            base,
            noise,
        }
    }
}

/// Scenario parameters; times in milliseconds since the simulator started.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioParams {
    /// Which scenario.
    pub scenario: Scenario,
    /// Ramp: lowest value of channel 0.
    pub ramp_low: f64,
    /// Ramp: highest value of channel 0.
    pub ramp_high: f64,
    /// Ramp: time from low to high and back to low (at least 1).
    pub ramp_period_ms: u64,
    /// Spikes: added to channel 0 for one tick.
    pub spike_height: f64,
    /// Spikes: time between spikes (at least 1).
    pub spike_every_ms: u64,
    /// Silent: channel 0 reports nothing from this time on.
    pub silent_after_ms: u64,
}

impl Default for ScenarioParams {
    /// The CLI defaults: steady; ramp 20..90 over 60 s; spikes of +50 every
    /// 10 s; silent after 10 s.
    fn default() -> Self {
        ScenarioParams {
            scenario: Scenario::Steady,
            ramp_low: 20.0,
            ramp_high: 90.0,
            ramp_period_ms: 60_000,
            spike_height: 50.0,
            spike_every_ms: 10_000,
            silent_after_ms: 10_000,
        }
    }
}

/// Generates the values of every channel, tick by tick.
#[derive(Debug, Clone)]
pub struct Signals {
    params: ScenarioParams,
    channels: Vec<ChannelSpec>,
    rng: Rng,
    /// Spike periods already spiked (spikes scenario).
    spikes_done: u64,
}

impl Signals {
    /// Signals for `channels` under `params`, noise seeded by `seed`.
    pub fn new(params: ScenarioParams, channels: Vec<ChannelSpec>, seed: u64) -> Self {
        Signals {
            params,
            channels,
            rng: Rng::new(seed),
            spikes_done: 0,
        }
    }

    /// The channels.
    pub fn channels(&self) -> &[ChannelSpec] {
        &self.channels
    }

    /// Fills `values` with one entry per channel for a tick at `elapsed_ms`
    /// since start: `None` when the channel does not report. Ticks must come
    /// in time order.
    pub fn sample(&mut self, elapsed_ms: u64, values: &mut Vec<Option<f64>>) {
        values.clear();
        for i in 0..self.channels.len() {
            let v = self.value(i, elapsed_ms);
            values.push(v);
        }
    }

    fn steady(&mut self, index: usize) -> f64 {
        let c = &self.channels[index];
        let (base, noise) = (c.base, c.noise);
        base + self.rng.symmetric(noise)
    }

    fn value(&mut self, index: usize, elapsed_ms: u64) -> Option<f64> {
        let p = &self.params;
        if index != 0 {
            return Some(self.steady(index));
        }
        match p.scenario {
            Scenario::Steady => Some(self.steady(0)),
            Scenario::Ramp => Some(triangle(
                elapsed_ms,
                p.ramp_period_ms,
                p.ramp_low,
                p.ramp_high,
            )),
            Scenario::Spikes => {
                let height = p.spike_height;
                let period = elapsed_ms / p.spike_every_ms.max(1);
                let mut v = self.steady(0);
                if period > self.spikes_done {
                    self.spikes_done = period;
                    v += height;
                }
                Some(v)
            }
            Scenario::Silent => {
                let silent = elapsed_ms >= p.silent_after_ms;
                let v = self.steady(0); // drawn anyway: other channels' noise does not shift
                (!silent).then_some(v)
            }
        }
    }
}

/// Triangle wave: `low` at 0, `high` at half the period, `low` again at the
/// period.
fn triangle(elapsed_ms: u64, period_ms: u64, low: f64, high: f64) -> f64 {
    let period = period_ms.max(1);
    let phase = (elapsed_ms % period) as f64 / period as f64;
    let up = if phase < 0.5 {
        2.0 * phase
    } else {
        2.0 * (1.0 - phase)
    };
    low + (high - low) * up
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn channels(n: usize) -> Vec<ChannelSpec> {
        (0..n).map(ChannelSpec::default_for).collect()
    }

    fn series(
        params: ScenarioParams,
        n: usize,
        times: impl IntoIterator<Item = u64>,
    ) -> Vec<Vec<Option<f64>>> {
        let mut s = Signals::new(params, channels(n), 1);
        let mut v = Vec::new();
        times
            .into_iter()
            .map(|t| {
                s.sample(t, &mut v);
                v.clone()
            })
            .collect()
    }

    #[test]
    fn default_channels() {
        let names: Vec<String> = channels(5)
            .into_iter()
            .map(|c| c.name + "/" + &c.unit)
            .collect();
        assert_eq!(
            names,
            [
                "temperature/degC",
                "humidity/%",
                "pressure/hPa",
                "ch3/",
                "ch4/"
            ]
        );
    }

    #[test]
    fn steady_stays_near_base() {
        for row in series(ScenarioParams::default(), 3, (0..1000).map(|i| i * 100)) {
            for (v, c) in row.iter().zip(channels(3)) {
                let v = v.unwrap();
                assert!((v - c.base).abs() <= c.noise, "{v} vs {c:?}");
            }
        }
    }

    #[test]
    fn ramp_goes_from_low_to_high_and_back_within_a_period() {
        let params = ScenarioParams {
            scenario: Scenario::Ramp,
            ramp_period_ms: 10_000,
            ..Default::default()
        };
        let ch0: Vec<f64> = series(params, 2, (0..=100).map(|i| i * 100))
            .iter()
            .map(|r| r[0].unwrap())
            .collect();
        assert_eq!(ch0[0], 20.0);
        assert_eq!(ch0[50], 90.0, "high at half the period");
        assert_eq!(ch0[100], 20.0, "low again after a period");
        assert!(ch0[..=50].windows(2).all(|w| w[1] > w[0]), "rises");
        assert!(ch0[50..].windows(2).all(|w| w[1] < w[0]), "falls");
        assert!(ch0.iter().all(|v| (20.0..=90.0).contains(v)));
        // Crosses a threshold of 80 upwards once and downwards once.
        let crossings = ch0
            .windows(2)
            .filter(|w| (w[0] > 80.0) != (w[1] > 80.0))
            .count();
        assert_eq!(crossings, 2);
    }

    #[test]
    fn spikes_once_per_period_on_channel_0() {
        let params = ScenarioParams {
            scenario: Scenario::Spikes,
            spike_every_ms: 1000,
            ..Default::default()
        };
        let rows = series(params, 2, (0..50).map(|i| i * 100));
        let spiked: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r[0].unwrap() > 60.0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(spiked, [10, 20, 30, 40]);
        assert!(rows.iter().all(|r| r[1].unwrap() < 60.0));
    }

    #[test]
    fn silent_stops_channel_0_only() {
        let params = ScenarioParams {
            scenario: Scenario::Silent,
            silent_after_ms: 1000,
            ..Default::default()
        };
        let rows = series(params, 3, (0..20).map(|i| i * 100));
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r[0].is_some(), i < 10, "tick {i}");
            assert!(r[1].is_some() && r[2].is_some());
        }
    }

    #[test]
    fn same_seed_same_values() {
        let a = series(ScenarioParams::default(), 3, 0..50);
        let b = series(ScenarioParams::default(), 3, 0..50);
        assert_eq!(a, b);
    }
}
