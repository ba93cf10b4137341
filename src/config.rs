//! What a module is made of: its configuration (PyTorch's constructor arguments), the (C,)
//! arrays it holds, and how a state file records the configuration.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::state::StateTensor;

/// The state-dict key of the batch counter.
pub(crate) const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";
/// Metadata keys of a state file written by this crate (PyTorch ignores them).
const CONFIG_KEYS: [&str; 6] = ["num_features", "eps", "momentum", "affine", "bias", "track_running_stats"];

/// The (C,) arrays a module can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buffer {
    Weight,
    Bias,
    RunningMean,
    RunningVar,
    GradWeight,
    GradBias,
}

impl Buffer {
    /// Every array a module can hold, in the order of [`Self::index`].
    pub const ALL: [Buffer; 6] =
        [Buffer::Weight, Buffer::Bias, Buffer::RunningMean, Buffer::RunningVar, Buffer::GradWeight, Buffer::GradBias];

    /// The float entries of a state dict, in PyTorch's order.
    pub const STATE: [Buffer; 4] = [Buffer::Weight, Buffer::Bias, Buffer::RunningMean, Buffer::RunningVar];

    /// Where the array sits in [`Self::ALL`], and in a module's table of arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// PyTorch's name (the state-dict key, or the attribute for gradients).
    pub const fn name(self) -> &'static str {
        match self {
            Buffer::Weight => "weight",
            Buffer::Bias => "bias",
            Buffer::RunningMean => "running_mean",
            Buffer::RunningVar => "running_var",
            Buffer::GradWeight => "grad_weight",
            Buffer::GradBias => "grad_bias",
        }
    }

    /// The configuration that leaves this buffer out.
    pub const fn absent_when(self) -> &'static str {
        match self {
            Buffer::Weight | Buffer::GradWeight => "affine=False",
            Buffer::Bias | Buffer::GradBias => "affine=False or bias=False",
            Buffer::RunningMean | Buffer::RunningVar => "track_running_stats=False",
        }
    }
}

/// The constructor arguments of `torch.nn.BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub num_features: usize,
    pub eps: f64,
    /// `None` means a cumulative average: factor 1/num_batches_tracked.
    pub momentum: Option<f64>,
    pub affine: bool,
    /// Whether an affine layer has a bias (PyTorch's keyword-only `bias=True`).
    pub bias: bool,
    pub track_running_stats: bool,
}

impl Config {
    /// PyTorch's defaults: eps 1e-5, momentum 0.1, affine with bias, tracked statistics.
    pub fn new(num_features: usize) -> Self {
        Config { num_features, eps: 1e-5, momentum: Some(0.1), affine: true, bias: true, track_running_stats: true }
    }

    /// The configuration of a PyTorch module holding `entries`: num_features from the shapes,
    /// affine, bias and tracking from which keys are present, PyTorch's default eps and momentum.
    pub fn infer(entries: &[(String, StateTensor)]) -> Result<Config> {
        let has = |key: &str| entries.iter().any(|(k, _)| k == key);
        let Some((key, tensor)) = entries.iter().find(|(k, _)| Buffer::STATE.iter().any(|b| b.name() == k)) else {
            return Err(Error::Format(
                "cannot tell num_features: the state has none of weight, bias, running_mean, running_var".into(),
            ));
        };
        let [num_features] = tensor.shape[..] else {
            return Err(Error::Format(format!(
                "cannot tell num_features: {key} has shape {}, expected one dimension",
                crate::error::shape_str(&tensor.shape)
            )));
        };
        let tracked = has("running_mean") || has("running_var") || has(NUM_BATCHES_TRACKED);
        let (affine, bias) = (has("weight") || has("bias"), has("bias"));
        Ok(Config { affine, bias, track_running_stats: tracked, ..Config::new(num_features) })
    }

    /// The same configuration with `overrides` applied.
    pub fn with(mut self, overrides: &ConfigOverrides) -> Config {
        self.num_features = overrides.num_features.unwrap_or(self.num_features);
        self.eps = overrides.eps.unwrap_or(self.eps);
        self.momentum = overrides.momentum.unwrap_or(self.momentum);
        self.affine = overrides.affine.unwrap_or(self.affine);
        self.bias = overrides.bias.unwrap_or(self.bias);
        self.track_running_stats = overrides.track_running_stats.unwrap_or(self.track_running_stats);
        self
    }

    pub(crate) fn to_metadata(&self) -> HashMap<String, String> {
        let momentum = self.momentum.map_or("None".to_string(), |m| format!("{m:?}"));
        let values = [
            self.num_features.to_string(),
            format!("{:?}", self.eps),
            momentum,
            self.affine.to_string(),
            self.bias.to_string(),
            self.track_running_stats.to_string(),
        ];
        CONFIG_KEYS.iter().zip(values).map(|(key, value)| (format!("batchnorm.{key}"), value)).collect()
    }

    /// The configuration a file written by this crate records, if it records one.
    pub(crate) fn from_metadata(metadata: &HashMap<String, String>) -> Result<Option<Config>> {
        let get = |key: &str| metadata.get(&format!("batchnorm.{key}"));
        if get("num_features").is_none() {
            return Ok(None);
        }
        fn parse<V: std::str::FromStr>(key: &str, value: Option<&String>) -> Result<V> {
            let value = value.ok_or_else(|| Error::Format(format!("metadata has no batchnorm.{key}")))?;
            value.parse().map_err(|_| Error::Format(format!("metadata batchnorm.{key} is not valid: {value:?}")))
        }
        let momentum = match get("momentum").map(String::as_str) {
            Some("None") => None,
            other => Some(parse("momentum", other.map(str::to_string).as_ref())?),
        };
        Ok(Some(Config {
            num_features: parse("num_features", get("num_features"))?,
            eps: parse("eps", get("eps"))?,
            momentum,
            affine: parse("affine", get("affine"))?,
            bias: parse("bias", get("bias"))?,
            track_running_stats: parse("track_running_stats", get("track_running_stats"))?,
        }))
    }
}

/// Constructor arguments that replace what a file or state dict says (or PyTorch's defaults).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigOverrides {
    pub num_features: Option<usize>,
    pub eps: Option<f64>,
    pub momentum: Option<Option<f64>>,
    pub affine: Option<bool>,
    pub bias: Option<bool>,
    pub track_running_stats: Option<bool>,
}
