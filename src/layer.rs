//! `BatchNorm2d` as a Rust type: configuration, parameters, running buffers and gradients.

use std::collections::HashMap;
use std::path::Path;

use crate::element::Element;
use crate::error::{Error, Result};
use crate::functional::{batch_norm, batch_norm_backward, SavedStats};
use crate::shape::{Shape, TensorRef};
use crate::state::{quoted_list, size_mismatch, LoadReport, StateTensor};
use crate::state_file::{self, RawTensor, TensorFile};

/// The state-dict key of the batch counter.
const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";
/// Metadata keys of a state file written by this crate (PyTorch ignores them).
const CONFIG_KEYS: [&str; 6] = ["num_features", "eps", "momentum", "affine", "bias", "track_running_stats"];
pub(crate) const DTYPE_KEY: &str = "batchnorm.dtype";
const TRAINING_KEY: &str = "batchnorm.training";

/// The (C,) arrays a layer can hold.
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
    /// Every array a layer can hold.
    pub const ALL: [Buffer; 6] =
        [Buffer::Weight, Buffer::Bias, Buffer::RunningMean, Buffer::RunningVar, Buffer::GradWeight, Buffer::GradBias];

    /// The float entries of a state dict, in PyTorch's order.
    pub const STATE: [Buffer; 4] = [Buffer::Weight, Buffer::Bias, Buffer::RunningMean, Buffer::RunningVar];

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

/// What a forward does in the layer's current mode.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForwardPlan {
    /// Normalize with the batch's own statistics (else with the running ones).
    pub batch_stats: bool,
    /// Blend the batch's statistics into the running ones and count the batch.
    pub updates: bool,
    /// The blend weight: the momentum, or 1/(batches + 1) for a cumulative average.
    pub factor: f64,
}

/// The constructor arguments of `torch.nn.BatchNorm2d`.
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

    fn to_metadata(&self) -> HashMap<String, String> {
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
    fn from_metadata(metadata: &HashMap<String, String>) -> Result<Option<Config>> {
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

/// `count` copies of `value`, or [`Error::Memory`] where the allocation is refused.
pub(crate) fn filled_vec<T: Copy>(count: usize, value: T) -> Result<Vec<T>> {
    let mut values = Vec::new();
    values.try_reserve_exact(count).map_err(|_| Error::allocation::<T>("a per-channel buffer", count))?;
    values.resize(count, value);
    Ok(values)
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

/// Batch normalization over (N, C, H, W) inputs with the semantics of `torch.nn.BatchNorm2d`.
///
/// Every buffer is allocated once, at construction, and only ever written in place: the Python
/// bindings hand out NumPy views of them.
///
/// ```
/// use batchnorm::{BatchNorm2d, Config, Shape, TensorRef};
///
/// let mut layer = BatchNorm2d::<f32>::new(Config::new(2))?;
/// let shape = Shape::new(2, 2, 1, 2);
/// let x = [1.0, 3.0, 10.0, 10.0, 5.0, 7.0, 20.0, 20.0];
/// let x = TensorRef::contiguous(&x, shape)?;
/// let mut y = vec![0.0; 8];
/// let saved = layer.forward(&x, &mut y)?;
/// // Channel 0 holds 1, 3, 5, 7 (mean 4, biased variance 5): y = (x − 4) / sqrt(5 + eps).
/// assert!((y[0] + 3.0 / 5.0_f32.sqrt()).abs() < 1e-5);
/// assert_eq!(layer.num_batches_tracked(), Some(1));
///
/// let ones = vec![1.0; 8];
/// let dy = TensorRef::contiguous(&ones, shape)?;
/// let mut dx = vec![0.0; 8];
/// layer.backward(&saved, &x, &dy, &mut dx)?;
/// assert_eq!(layer.grad_bias(), Some(&[4.0, 4.0][..]));
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BatchNorm2d<T: Element> {
    config: Config,
    training: bool,
    weight: Option<Vec<T>>,
    bias: Option<Vec<T>>,
    running_mean: Option<Vec<T>>,
    running_var: Option<Vec<T>>,
    num_batches_tracked: Option<i64>,
    grad_weight: Option<Vec<T>>,
    grad_bias: Option<Vec<T>>,
    /// Whether the grad buffers hold a gradient (PyTorch's `.grad is not None`).
    has_grad: bool,
}

impl<T: Element> BatchNorm2d<T> {
    /// A layer in training mode with weight 1, bias 0, running mean 0 and running variance 1.
    /// A `num_features` too large to allocate is [`Error::Memory`], never an abort.
    pub fn new(config: Config) -> Result<Self> {
        let c = config.num_features;
        if c == 0 {
            return Err(Error::InvalidArgument("num_features must be a positive integer, got 0".into()));
        }
        let filled = |on: bool, value: f64| on.then(|| filled_vec(c, T::from_f64(value))).transpose();
        let (affine, bias, track) = (config.affine, config.affine && config.bias, config.track_running_stats);
        Ok(BatchNorm2d {
            weight: filled(affine, 1.0)?,
            bias: filled(bias, 0.0)?,
            running_mean: filled(track, 0.0)?,
            running_var: filled(track, 1.0)?,
            num_batches_tracked: track.then_some(0),
            grad_weight: filled(affine, 0.0)?,
            grad_bias: filled(bias, 0.0)?,
            has_grad: false,
            training: true,
            config,
        })
    }

    /// Takes the state of `other`, a layer of the same configuration, by copying its values into
    /// this layer's own buffers: memory that views of this layer may reach is never replaced.
    pub fn copy_state_from(&mut self, other: &BatchNorm2d<T>) -> Result<()> {
        if self.config != other.config {
            return Err(Error::InvalidArgument(format!(
                "cannot copy the state of a layer configured as {:?} into one configured as {:?}",
                other.config, self.config
            )));
        }
        let pairs = [
            (&mut self.weight, &other.weight),
            (&mut self.bias, &other.bias),
            (&mut self.running_mean, &other.running_mean),
            (&mut self.running_var, &other.running_var),
            (&mut self.grad_weight, &other.grad_weight),
            (&mut self.grad_bias, &other.grad_bias),
        ];
        for (into, from) in pairs {
            if let (Some(into), Some(from)) = (into.as_deref_mut(), from.as_deref()) {
                into.copy_from_slice(from);
            }
        }
        self.num_batches_tracked = other.num_batches_tracked;
        self.has_grad = other.has_grad;
        self.training = other.training;
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn is_training(&self) -> bool {
        self.training
    }
    /// `train(true)` / `eval()`.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }
    /// One of the layer's (C,) arrays; `None` where the configuration has none (and, for the
    /// gradients, before the first backward since [`Self::zero_grad`]).
    pub fn buffer(&self, which: Buffer) -> Option<&[T]> {
        match which {
            Buffer::Weight => self.weight.as_deref(),
            Buffer::Bias => self.bias.as_deref(),
            Buffer::RunningMean => self.running_mean.as_deref(),
            Buffer::RunningVar => self.running_var.as_deref(),
            Buffer::GradWeight => self.grad_weight.as_deref().filter(|_| self.has_grad),
            Buffer::GradBias => self.grad_bias.as_deref().filter(|_| self.has_grad),
        }
    }
    /// The memory of one of the layer's arrays, whether or not it holds a value now (gradients
    /// before a backward): for overlap checks and device copies.
    #[cfg(any(feature = "python", feature = "cuda"))]
    pub(crate) fn storage(&self, which: Buffer) -> Option<&[T]> {
        match which {
            Buffer::Weight => self.weight.as_deref(),
            Buffer::Bias => self.bias.as_deref(),
            Buffer::RunningMean => self.running_mean.as_deref(),
            Buffer::RunningVar => self.running_var.as_deref(),
            Buffer::GradWeight => self.grad_weight.as_deref(),
            Buffer::GradBias => self.grad_bias.as_deref(),
        }
    }
    /// The same array, to write in place (an optimizer step, or loading values).
    pub fn buffer_mut(&mut self, which: Buffer) -> Option<&mut [T]> {
        let has_grad = self.has_grad;
        match which {
            Buffer::Weight => self.weight.as_deref_mut(),
            Buffer::Bias => self.bias.as_deref_mut(),
            Buffer::RunningMean => self.running_mean.as_deref_mut(),
            Buffer::RunningVar => self.running_var.as_deref_mut(),
            Buffer::GradWeight => self.grad_weight.as_deref_mut().filter(|_| has_grad),
            Buffer::GradBias => self.grad_bias.as_deref_mut().filter(|_| has_grad),
        }
    }
    pub fn weight(&self) -> Option<&[T]> {
        self.buffer(Buffer::Weight)
    }
    pub fn bias(&self) -> Option<&[T]> {
        self.buffer(Buffer::Bias)
    }
    pub fn running_mean(&self) -> Option<&[T]> {
        self.buffer(Buffer::RunningMean)
    }
    pub fn running_var(&self) -> Option<&[T]> {
        self.buffer(Buffer::RunningVar)
    }
    /// Σ over backward calls since the last [`Self::zero_grad`]; `None` before any.
    pub fn grad_weight(&self) -> Option<&[T]> {
        self.buffer(Buffer::GradWeight)
    }
    pub fn grad_bias(&self) -> Option<&[T]> {
        self.buffer(Buffer::GradBias)
    }
    pub fn num_batches_tracked(&self) -> Option<i64> {
        self.num_batches_tracked
    }

    /// Forgets the gradients (PyTorch's `zero_grad(set_to_none=True)`).
    pub fn zero_grad(&mut self) {
        self.has_grad = false;
    }

    /// Running mean 0, running variance 1, no batches tracked.
    pub fn reset_running_stats(&mut self) {
        let fill =
            |buffer: &mut Option<Vec<T>>, value: f64| buffer.iter_mut().flatten().for_each(|v| *v = T::from_f64(value));
        fill(&mut self.running_mean, 0.0);
        fill(&mut self.running_var, 1.0);
        if let Some(count) = self.num_batches_tracked.as_mut() {
            *count = 0;
        }
    }

    /// Running statistics reset, weight 1 and bias 0.
    pub fn reset_parameters(&mut self) {
        self.reset_running_stats();
        self.weight.iter_mut().flatten().for_each(|v| *v = T::from_f64(1.0));
        self.bias.iter_mut().flatten().for_each(|v| *v = T::from_f64(0.0));
    }

    /// What a forward in the current mode does, on any device.
    pub(crate) fn forward_plan(&self) -> ForwardPlan {
        let batch_stats = self.training || !self.config.track_running_stats;
        let updates = self.training && self.config.track_running_stats;
        let factor = match (updates, self.config.momentum, self.num_batches_tracked) {
            (true, None, Some(count)) => 1.0 / (count + 1) as f64,
            (_, momentum, _) => momentum.unwrap_or(0.0),
        };
        ForwardPlan { batch_stats, updates, factor }
    }

    /// Counts a batch that a training forward has normalized.
    pub(crate) fn count_batch(&mut self) {
        if let Some(count) = self.num_batches_tracked.as_mut() {
            *count += 1;
        }
    }

    /// Normalizes `x` into `y` (C-contiguous, `x.shape().numel()` long). In training mode with
    /// tracked statistics, updates the running buffers and counts the batch. Returns what
    /// [`Self::backward`] needs. A call that fails changes nothing.
    pub fn forward(&mut self, x: &TensorRef<'_, T>, y: &mut [T]) -> Result<SavedStats> {
        self.check_channels(x.shape())?;
        let plan = self.forward_plan();
        let (running_mean, running_var) = if plan.updates || !plan.batch_stats {
            (self.running_mean.as_deref_mut(), self.running_var.as_deref_mut())
        } else {
            (None, None)
        };
        let saved = batch_norm(
            x,
            y,
            running_mean,
            running_var,
            self.weight.as_deref(),
            self.bias.as_deref(),
            plan.batch_stats,
            plan.factor,
            self.config.eps,
        )?;
        if plan.updates {
            self.count_batch();
        }
        Ok(saved)
    }

    /// Whether the grad buffers hold a gradient that the next backward adds to.
    #[cfg(feature = "cuda")]
    pub(crate) fn has_grad(&self) -> bool {
        self.has_grad
    }

    /// Records that a backward wrote the gradients (there are none without affine).
    pub(crate) fn mark_backward(&mut self) {
        self.has_grad = self.config.affine;
    }

    /// Writes grad_input for the forward that returned `saved` into `dx`, and adds the weight and
    /// bias gradients into [`Self::grad_weight`] and [`Self::grad_bias`].
    pub fn backward(
        &mut self,
        saved: &SavedStats,
        x: &TensorRef<'_, T>,
        dy: &TensorRef<'_, T>,
        dx: &mut [T],
    ) -> Result<()> {
        self.check_channels(saved.shape())?;
        let grads = batch_norm_backward(dy, x, dx, saved, self.weight.as_deref())?;
        let fresh = !self.has_grad;
        let accumulate = |into: &mut Option<Vec<T>>, add: &[T]| {
            for (acc, &g) in into.iter_mut().flatten().zip(add) {
                *acc = if fresh { g } else { T::from_f64(acc.to_f64() + g.to_f64()) };
            }
        };
        accumulate(&mut self.grad_weight, &grads.grad_weight);
        accumulate(&mut self.grad_bias, &grads.grad_bias);
        self.mark_backward();
        Ok(())
    }

    pub(crate) fn check_channels(&self, shape: Shape) -> Result<()> {
        if shape.c != self.config.num_features {
            return Err(Error::ChannelMismatch {
                expected: self.config.num_features,
                got: shape.c,
                shape: shape.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// The keys this layer's state dict has, in PyTorch's order.
    pub fn state_keys(&self) -> Vec<&'static str> {
        let floats = Buffer::STATE.into_iter().filter(|b| self.buffer(*b).is_some()).map(Buffer::name);
        floats.chain(self.num_batches_tracked.map(|_| NUM_BATCHES_TRACKED)).collect()
    }

    /// PyTorch's `state_dict()`: copies of the parameters and buffers.
    pub fn state_dict(&self) -> Vec<(&'static str, StateTensor)> {
        let floats = Buffer::STATE
            .into_iter()
            .filter_map(|b| self.buffer(b).map(|values| (b.name(), StateTensor::float(values))));
        let counter = self.num_batches_tracked.map(|n| (NUM_BATCHES_TRACKED, StateTensor::scalar_int(n)));
        floats.chain(counter).collect()
    }

    /// PyTorch's `load_state_dict`. Every key and shape is checked before anything is written;
    /// under `strict`, missing or unexpected keys are an error naming all of them.
    pub fn load_state_dict(&mut self, entries: &[(String, StateTensor)], strict: bool) -> Result<LoadReport> {
        let keys = self.state_keys();
        let find = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        // As PyTorch: a state without num_batches_tracked (from before it existed) keeps the
        // current count rather than counting as missing.
        let report = LoadReport {
            missing_keys: keys
                .iter()
                .filter(|k| find(k).is_none() && **k != NUM_BATCHES_TRACKED)
                .map(|k| k.to_string())
                .collect(),
            unexpected_keys: entries.iter().map(|(k, _)| k).filter(|k| !keys.contains(&k.as_str())).cloned().collect(),
        };
        let mut problems = Vec::new();
        if strict && !report.unexpected_keys.is_empty() {
            problems.push(format!("Unexpected key(s) in state_dict: {}.", quoted_list(&report.unexpected_keys)));
        }
        if strict && !report.missing_keys.is_empty() {
            problems.push(format!("Missing key(s) in state_dict: {}.", quoted_list(&report.missing_keys)));
        }
        let c = self.config.num_features;
        for key in &keys {
            let Some(value) = find(key) else { continue };
            let scalar = *key == NUM_BATCHES_TRACKED;
            let shape_ok = if scalar { value.shape.is_empty() || value.shape == [1] } else { value.shape == [c] };
            let count_ok = value.len() == value.shape.iter().product::<usize>();
            if !shape_ok || !count_ok {
                let expected: &[usize] = if scalar { &[] } else { &[c] };
                problems.push(format!("{}.", size_mismatch(key, &value.shape, expected)));
            }
        }
        if !problems.is_empty() {
            return Err(Error::StateDict(format!(
                "Error(s) in loading state_dict for BatchNorm2d:\n\t{}",
                problems.join("\n\t")
            )));
        }
        for buffer in Buffer::STATE {
            if let (Some(value), Some(target)) = (find(buffer.name()), self.buffer_mut(buffer)) {
                value.cast_into(target);
            }
        }
        if let (Some(value), Some(count)) = (find(NUM_BATCHES_TRACKED), self.num_batches_tracked.as_mut()) {
            *count = value.first_int().unwrap_or(*count);
        }
        Ok(report)
    }

    /// A layer with `config` holding `entries`, loaded strictly.
    pub fn from_state(config: Config, entries: &[(String, StateTensor)]) -> Result<Self> {
        let mut layer = BatchNorm2d::new(config)?;
        layer.load_state_dict(entries, true)?;
        Ok(layer)
    }

    /// The state as a safetensors file PyTorch loads (`weight`, `bias`, `running_mean`,
    /// `running_var` in the layer's dtype, `num_batches_tracked` as I64 of shape []), with the
    /// configuration, dtype and training flag in its metadata.
    pub fn to_tensor_file(&self) -> TensorFile {
        let tensors = self
            .state_dict()
            .iter()
            .map(|(key, tensor)| (key.to_string(), RawTensor::from_state::<T>(tensor)))
            .collect();
        let mut metadata = self.config.to_metadata();
        metadata.insert("format".into(), "pt".into());
        metadata.insert(DTYPE_KEY.into(), T::DTYPE.into());
        metadata.insert(TRAINING_KEY.into(), self.training.to_string());
        TensorFile { tensors, metadata }
    }

    /// A layer rebuilt from a state file: its recorded configuration, or for a file PyTorch wrote,
    /// the configuration its tensors imply with PyTorch's default eps and momentum; `overrides`
    /// replace either. Values of another float dtype are cast.
    pub fn from_tensor_file(file: &TensorFile, overrides: &ConfigOverrides) -> Result<Self> {
        let mut entries = Vec::with_capacity(file.tensors.len());
        for (name, tensor) in &file.tensors {
            entries.push((name.clone(), tensor.to_state(name)?));
        }
        let config = match Config::from_metadata(&file.metadata)? {
            Some(config) => config,
            None => Config::infer(&entries)?,
        };
        let mut layer = BatchNorm2d::from_state(config.with(overrides), &entries)?;
        layer.training = file.metadata.get(TRAINING_KEY).is_none_or(|t| t == "true");
        Ok(layer)
    }

    /// Writes [`Self::to_tensor_file`] to `path`, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        state_file::save(path, &self.to_tensor_file())
    }

    /// Reads a layer from a state file (see [`Self::from_tensor_file`]).
    pub fn from_file(path: impl AsRef<Path>, overrides: &ConfigOverrides) -> Result<Self> {
        BatchNorm2d::from_tensor_file(&state_file::load(path)?, overrides)
    }
}
