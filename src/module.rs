//! The module: one type, [`BatchNorm`], for `BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d`, over
//! `f32` or `f64`, on the CPU or a CUDA device. It owns the configuration, the mode, the
//! parameters, running buffers and gradients, and the statistics of the last forward; every
//! method works where the arrays live. The kinds differ only in the input ranks they accept.

use std::path::Path;

#[cfg(feature = "cuda")]
use crate::checks::check_same_storage;
use crate::checks::{check_batch_size, check_channels, check_eps, check_len, check_num_features};
use crate::checks::{check_same_dims, check_target, Owner, Span};
use crate::config::{Buffer, Config, ConfigOverrides, NUM_BATCHES_TRACKED};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::functional::{batch_norm, batch_norm_backward, SavedStats};
use crate::shape::{Dims, Ranks, Shape, TensorMut, TensorRef};
use crate::state::{quoted_list, size_mismatch, LoadReport, StateTensor};
use crate::state_file::{self, RawTensor, TensorFile};

#[cfg(feature = "cuda")]
use crate::cuda::{DeviceArrays, DeviceBuffer, DeviceTensor, Event, Stream};
#[cfg(feature = "cuda")]
use std::sync::Arc;

pub(crate) const DTYPE_KEY: &str = "batchnorm.dtype";
const TRAINING_KEY: &str = "batchnorm.training";
const CLASS_KEY: &str = "batchnorm.class";

/// Which of PyTorch's classes a module is: it decides the input ranks accepted and what errors say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// (N, C) or (N, C, L).
    BatchNorm1d,
    /// (N, C, H, W), or an unbatched (C, H, W).
    BatchNorm2d,
    /// (N, C, D, H, W).
    BatchNorm3d,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::BatchNorm1d, Kind::BatchNorm2d, Kind::BatchNorm3d];

    /// PyTorch's class name.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::BatchNorm1d => "BatchNorm1d",
            Kind::BatchNorm2d => "BatchNorm2d",
            Kind::BatchNorm3d => "BatchNorm3d",
        }
    }

    /// The kind PyTorch calls `name`.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The input ranks this kind accepts, and how it reads them.
    pub const fn ranks(self) -> Ranks {
        match self {
            Kind::BatchNorm1d => Ranks::Sequence,
            Kind::BatchNorm2d => Ranks::Planes,
            Kind::BatchNorm3d => Ranks::Volumes,
        }
    }
}

/// What a forward does in the module's current mode, on any device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForwardPlan {
    /// Normalize with the batch's own statistics (else with the running ones).
    pub batch_stats: bool,
    /// Blend the batch's statistics into the running ones and count the batch.
    pub updates: bool,
    /// The blend weight: the momentum, or 1/(batches + 1) for a cumulative average.
    pub factor: f64,
}

/// `count` copies of `value`, or [`Error::Memory`] where the allocation is refused.
pub(crate) fn filled_vec<T: Copy>(count: usize, value: T) -> Result<Vec<T>> {
    let mut values = Vec::new();
    values.try_reserve_exact(count).map_err(|_| Error::allocation::<T>("a per-channel buffer", count))?;
    values.resize(count, value);
    Ok(values)
}

/// A module's (C,) arrays, indexed by [`Buffer::index`]; `None` where the configuration has none.
pub(crate) type Arrays<T> = [Option<Vec<T>>; 6];

/// What the last forward left for the backward.
#[derive(Clone, Debug)]
enum Saved {
    Host {
        stats: SavedStats,
        dims: Dims,
    },
    /// The statistics stay in the device workspace.
    #[cfg(feature = "cuda")]
    Device {
        dims: Dims,
        from_batch: bool,
    },
}

/// Batch normalization with the semantics of `torch.nn.BatchNorm1d`, `BatchNorm2d` and
/// `BatchNorm3d` (by [`Kind`]).
///
/// The host arrays are allocated once, at construction, and only ever written in place (the
/// Python bindings hand out NumPy views of them); on a device, the device arrays hold the values
/// and the host arrays get them back when the module returns to the CPU.
///
/// ```
/// use batchnorm::{BatchNorm, Config, Kind, Ranks, TensorRef};
///
/// let mut layer = BatchNorm::<f32>::new(Kind::BatchNorm1d, Config::new(2))?;
/// let x = [1.0, 10.0, 3.0, 10.0, 5.0, 20.0, 7.0, 20.0]; // (4, 2)
/// let x = TensorRef::contiguous_dims(&x, &[4, 2], Ranks::Sequence)?;
/// let mut y = vec![0.0; 8];
/// layer.forward(&x, &mut y)?;
/// // Channel 0 holds 1, 3, 5, 7 (mean 4, biased variance 5): y = (x − 4) / sqrt(5 + eps).
/// assert!((y[0] + 3.0 / 5.0_f32.sqrt()).abs() < 1e-5);
/// assert_eq!(layer.num_batches_tracked(), Some(1));
///
/// let ones = vec![1.0; 8];
/// let dy = TensorRef::contiguous_dims(&ones, &[4, 2], Ranks::Sequence)?;
/// let mut dx = vec![0.0; 8];
/// layer.backward(&x, &dy, &mut dx)?;
/// assert_eq!(layer.grad_bias(), Some(&[4.0, 4.0][..]));
/// # Ok::<(), batchnorm::Error>(())
/// ```
pub struct BatchNorm<T: Element> {
    kind: Kind,
    config: Config,
    training: bool,
    num_batches_tracked: Option<i64>,
    /// Whether the grad arrays hold a gradient (PyTorch's `.grad is not None`).
    has_grad: bool,
    host: Arrays<T>,
    /// Where the arrays hold their values while the module is on a device.
    #[cfg(feature = "cuda")]
    device: Option<DeviceArrays<T>>,
    saved: Option<Saved>,
}

impl<T: Element> std::fmt::Debug for BatchNorm<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct(self.kind.name());
        out.field("dtype", &T::DTYPE).field("config", &self.config).field("training", &self.training);
        #[cfg(feature = "cuda")]
        out.field("device", &self.device());
        out.finish_non_exhaustive()
    }
}

impl<T: Element> BatchNorm<T> {
    /// A module in training mode with weight 1, bias 0, running mean 0 and running variance 1.
    /// A `num_features` too large to allocate is [`Error::Memory`], never an abort.
    pub fn new(kind: Kind, config: Config) -> Result<Self> {
        check_num_features(config.num_features)?;
        let c = config.num_features;
        let filled = |on: bool, value: f64| on.then(|| filled_vec(c, T::from_f64(value))).transpose();
        let (affine, bias, track) = (config.affine, config.affine && config.bias, config.track_running_stats);
        Ok(BatchNorm {
            host: [
                filled(affine, 1.0)?,
                filled(bias, 0.0)?,
                filled(track, 0.0)?,
                filled(track, 1.0)?,
                filled(affine, 0.0)?,
                filled(bias, 0.0)?,
            ],
            num_batches_tracked: track.then_some(0),
            has_grad: false,
            training: true,
            #[cfg(feature = "cuda")]
            device: None,
            saved: None,
            kind,
            config,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
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
    pub fn num_batches_tracked(&self) -> Option<i64> {
        self.num_batches_tracked
    }

    /// Whether the arrays hold their values in host memory.
    fn on_cpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.device.is_none();
        #[cfg(not(feature = "cuda"))]
        true
    }

    /// Whether `which` holds a value now: the configuration has it, and for a gradient, a
    /// backward has written it since the last [`Self::zero_grad`].
    fn holds(&self, which: Buffer) -> bool {
        let gradient = matches!(which, Buffer::GradWeight | Buffer::GradBias);
        self.host[which.index()].is_some() && (self.has_grad || !gradient)
    }

    fn absent(which: Buffer) -> Error {
        Error::InvalidArgument(format!(
            "cannot assign {}: this module has none ({})",
            which.name(),
            which.absent_when()
        ))
    }

    /// One of the module's (C,) arrays on the CPU, in place; `None` where the configuration has
    /// none, for a gradient before the first backward since [`Self::zero_grad`], and while the
    /// module is on a device (see [`Self::read_buffer`]).
    pub fn buffer(&self, which: Buffer) -> Option<&[T]> {
        let here = self.on_cpu() && self.holds(which);
        self.host[which.index()].as_deref().filter(|_| here)
    }
    /// The same array, to write in place (an optimizer step on the CPU).
    pub fn buffer_mut(&mut self, which: Buffer) -> Option<&mut [T]> {
        let here = self.on_cpu() && self.holds(which);
        self.host[which.index()].as_deref_mut().filter(|_| here)
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

    /// A copy of one of the module's arrays, wherever it lives (`None` as for [`Self::buffer`]).
    pub fn read_buffer(&self, which: Buffer) -> Result<Option<Vec<T>>> {
        if !self.holds(which) {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        if let Some(arrays) = &self.device {
            return arrays.read(which);
        }
        Ok(self.host[which.index()].clone())
    }

    /// Copies `values` into one of the module's arrays where it lives, touching no other.
    pub fn write_buffer(&mut self, which: Buffer, values: &[T]) -> Result<()> {
        if !self.holds(which) {
            return Err(Self::absent(which));
        }
        check_len(which.name(), values.len(), self.config.num_features)?;
        self.write_storage(which, values)
    }

    /// Writes an array whether or not it holds a value now (the configuration must have it).
    fn write_storage(&mut self, which: Buffer, values: &[T]) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(arrays) = &mut self.device {
            return arrays.write(which, values);
        }
        let target = self.host[which.index()].as_deref_mut().ok_or_else(|| Self::absent(which))?;
        target.copy_from_slice(values);
        Ok(())
    }

    /// Sets every value of an array the configuration has (nothing where it has none).
    fn fill(&mut self, which: Buffer, value: f64) -> Result<()> {
        let Some(host) = self.host[which.index()].as_deref_mut() else { return Ok(()) };
        #[cfg(feature = "cuda")]
        if let Some(arrays) = &mut self.device {
            return arrays.write(which, &filled_vec(host.len(), T::from_f64(value))?);
        }
        host.fill(T::from_f64(value));
        Ok(())
    }

    /// The host memory of every array the configuration has, whether or not it holds a value
    /// now: what no output of a call may overlap, and what NumPy views address.
    pub fn host_spans(&self) -> impl Iterator<Item = Span> + '_ {
        let arrays = Buffer::ALL.into_iter().zip(&self.host);
        arrays.filter_map(|(which, data)| Some(Span::of_slice(Owner::Module(which), data.as_deref()?)))
    }

    /// Forgets the gradients (PyTorch's `zero_grad(set_to_none=True)`).
    pub fn zero_grad(&mut self) {
        self.has_grad = false;
    }

    /// Running mean 0, running variance 1, no batches tracked.
    pub fn reset_running_stats(&mut self) -> Result<()> {
        self.fill(Buffer::RunningMean, 0.0)?;
        self.fill(Buffer::RunningVar, 1.0)?;
        if let Some(count) = self.num_batches_tracked.as_mut() {
            *count = 0;
        }
        Ok(())
    }

    /// Running statistics reset, weight 1 and bias 0.
    pub fn reset_parameters(&mut self) -> Result<()> {
        self.reset_running_stats()?;
        self.fill(Buffer::Weight, 1.0)?;
        self.fill(Buffer::Bias, 0.0)
    }

    /// A copy of the module (configuration, mode, counters and every array, on the same device
    /// when it is on one), without the statistics of the last forward.
    pub fn try_clone(&self) -> Result<Self> {
        let mut copy = BatchNorm::new(self.kind, self.config.clone())?;
        copy.copy_state_from(self)?;
        #[cfg(feature = "cuda")]
        if let Some(device) = self.device() {
            copy.to_device(&device.clone())?;
        }
        Ok(copy)
    }

    /// Takes the state of `other` (of any kind, the same configuration and dtype) by copying
    /// its values into this module's own arrays, wherever each module's arrays live.
    pub fn copy_state_from(&mut self, other: &BatchNorm<T>) -> Result<()> {
        if self.config != other.config {
            return Err(Error::InvalidArgument(format!(
                "cannot copy the state of a module configured as {:?} into one configured as {:?}",
                other.config, self.config
            )));
        }
        for which in Buffer::ALL {
            if let Some(values) = other.values_of(which)? {
                self.write_storage(which, &values)?;
            }
        }
        self.num_batches_tracked = other.num_batches_tracked;
        self.has_grad = other.has_grad;
        self.training = other.training;
        Ok(())
    }

    /// An array's values wherever it lives, whether or not it holds a value now.
    fn values_of(&self, which: Buffer) -> Result<Option<Vec<T>>> {
        #[cfg(feature = "cuda")]
        if let Some(arrays) = &self.device {
            return arrays.read(which);
        }
        Ok(self.host[which.index()].clone())
    }

    /// What a forward in the current mode does, after checking that it can: the input's rank
    /// and channels, eps, and the batch size when normalizing by batch statistics.
    fn begin_forward(&self, shape: Shape, dims: Dims) -> Result<ForwardPlan> {
        if !dims.fit(self.kind.ranks()) {
            return Err(dims.rank_error("input", self.kind.ranks()));
        }
        check_channels(self.config.num_features, shape, dims)?;
        let batch_stats = self.training || !self.config.track_running_stats;
        check_eps(self.config.eps, batch_stats)?;
        if batch_stats {
            check_batch_size(shape, dims)?;
        }
        let updates = self.training && self.config.track_running_stats;
        let factor = match (updates, self.config.momentum, self.num_batches_tracked) {
            (true, None, Some(count)) => 1.0 / (count + 1) as f64,
            (_, momentum, _) => momentum.unwrap_or(0.0),
        };
        Ok(ForwardPlan { batch_stats, updates, factor })
    }

    /// Counts a batch that a training forward has normalized.
    fn end_forward(&mut self, plan: ForwardPlan, saved: Saved) {
        if plan.updates {
            if let Some(count) = self.num_batches_tracked.as_mut() {
                *count += 1;
            }
        }
        self.saved = Some(saved);
    }

    /// Normalizes `x` into `y` (C-contiguous, `x.shape().numel()` long). In training mode with
    /// tracked statistics, updates the running buffers and counts the batch; keeps what
    /// [`Self::backward`] needs. A call that fails changes nothing. On a device, `x` and `y` are
    /// staged through device memory (a convenience; device tensors are the fast path).
    ///
    /// `y` is a slice of the element type, or [`TensorMut::half`] output: a float32 module given
    /// `x` from [`TensorRef::half`] and half output runs PyTorch's mixed precision (float32
    /// statistics, parameters and gradients; the output rounded once to the input's dtype).
    pub fn forward<'y>(&mut self, x: &TensorRef<'_, T>, y: impl Into<TensorMut<'y, T>>) -> Result<()> {
        let y = y.into();
        let plan = self.begin_forward(x.shape(), x.dims())?;
        check_target(x.shape(), &y)?;
        #[cfg(feature = "cuda")]
        if let Some(arrays) = &self.device {
            let device = arrays.device().clone();
            let (xb, yb) =
                (DeviceBuffer::from_host(&device, &x.contiguous_values()?)?, DeviceBuffer::unset(&device, y.len())?);
            // SAFETY: both buffers hold the input's shape on the module's device and outlive the
            // work, which `synchronize` waits for.
            unsafe { self.forward_on_device(xb.tensor(x.dims())?, yb.tensor(x.dims())?, Stream::DEFAULT)? };
            self.synchronize()?;
            return y.write_all(&yb.to_host()?, x.shape());
        }
        let [weight, bias, running_mean, running_var, _, _] = &mut self.host;
        let (running_mean, running_var) = if plan.updates || !plan.batch_stats {
            (running_mean.as_deref_mut(), running_var.as_deref_mut())
        } else {
            (None, None)
        };
        let stats = batch_norm(
            x,
            y,
            running_mean,
            running_var,
            weight.as_deref(),
            bias.as_deref(),
            plan.batch_stats,
            plan.factor,
            self.config.eps,
        )?;
        self.end_forward(plan, Saved::Host { stats, dims: x.dims() });
        Ok(())
    }

    /// What the last forward on the CPU normalized with.
    pub fn saved(&self) -> Option<&SavedStats> {
        match &self.saved {
            Some(Saved::Host { stats, .. }) => Some(stats),
            _ => None,
        }
    }

    /// Writes grad_input of the last forward (whose input `x` was) into `dx`, and adds the
    /// weight and bias gradients into [`Self::grad_weight`] and [`Self::grad_bias`].
    /// `dx` takes what `y` of [`Self::forward`] takes (half grad_input of half tensors).
    pub fn backward<'d>(
        &mut self,
        x: &TensorRef<'_, T>,
        dy: &TensorRef<'_, T>,
        dx: impl Into<TensorMut<'d, T>>,
    ) -> Result<()> {
        let dx = dx.into();
        check_target(x.shape(), &dx)?;
        #[cfg(feature = "cuda")]
        if let Some(arrays) = &self.device {
            let device = arrays.device().clone();
            let xb = DeviceBuffer::from_host(&device, &x.contiguous_values()?)?;
            let dyb = DeviceBuffer::from_host(&device, &dy.contiguous_values()?)?;
            let dxb = DeviceBuffer::unset(&device, dx.len())?;
            // SAFETY: as in `forward`.
            unsafe {
                self.backward_on_device(
                    xb.tensor(x.dims())?,
                    dyb.tensor(dy.dims())?,
                    dxb.tensor(x.dims())?,
                    Stream::DEFAULT,
                )?
            };
            self.synchronize()?;
            return dx.write_all(&dxb.to_host()?, x.shape());
        }
        let Some(Saved::Host { stats, dims }) = &self.saved else { return Err(Error::NoForward) };
        check_same_dims("input", x.dims(), *dims)?;
        check_same_dims("grad_output", dy.dims(), *dims)?;
        let grads = batch_norm_backward(dy, x, dx, stats, self.host[Buffer::Weight.index()].as_deref())?;
        let fresh = !self.has_grad;
        let [_, _, _, _, grad_weight, grad_bias] = &mut self.host;
        let accumulate = |into: &mut Option<Vec<T>>, add: &[T]| {
            for (acc, &g) in into.iter_mut().flatten().zip(add) {
                *acc = if fresh { g } else { T::from_f64(acc.to_f64() + g.to_f64()) };
            }
        };
        accumulate(grad_weight, &grads.grad_weight);
        accumulate(grad_bias, &grads.grad_bias);
        self.has_grad = self.config.affine;
        Ok(())
    }

    /// The keys this module's state dict has, in PyTorch's order.
    pub fn state_keys(&self) -> Vec<&'static str> {
        let floats = Buffer::STATE.into_iter().filter(|b| self.host[b.index()].is_some()).map(Buffer::name);
        floats.chain(self.num_batches_tracked.map(|_| NUM_BATCHES_TRACKED)).collect()
    }

    /// PyTorch's `state_dict()`: copies of the parameters and buffers.
    pub fn state_dict(&self) -> Result<Vec<(&'static str, StateTensor)>> {
        let mut entries = Vec::with_capacity(5);
        for which in Buffer::STATE {
            if let Some(values) = self.read_buffer(which)? {
                entries.push((which.name(), StateTensor::float(&values)));
            }
        }
        entries.extend(self.num_batches_tracked.map(|n| (NUM_BATCHES_TRACKED, StateTensor::scalar_int(n))));
        Ok(entries)
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
                "Error(s) in loading state_dict for {}:\n\t{}",
                self.kind.name(),
                problems.join("\n\t")
            )));
        }
        let mut values = filled_vec(c, T::ZERO)?;
        for which in Buffer::STATE {
            if let (Some(value), true) = (find(which.name()), self.host[which.index()].is_some()) {
                value.cast_into(&mut values);
                self.write_storage(which, &values)?;
            }
        }
        if let (Some(value), Some(count)) = (find(NUM_BATCHES_TRACKED), self.num_batches_tracked.as_mut()) {
            *count = value.first_int().unwrap_or(*count);
        }
        Ok(report)
    }

    /// A module of `kind` with `config` holding `entries`, loaded strictly.
    pub fn from_state(kind: Kind, config: Config, entries: &[(String, StateTensor)]) -> Result<Self> {
        let mut module = BatchNorm::new(kind, config)?;
        module.load_state_dict(entries, true)?;
        Ok(module)
    }

    /// The state as a safetensors file PyTorch loads (`weight`, `bias`, `running_mean`,
    /// `running_var` in the module's dtype, `num_batches_tracked` as I64 of shape []), with the
    /// class, configuration, dtype and training flag in its metadata.
    pub fn to_tensor_file(&self) -> Result<TensorFile> {
        let state = self.state_dict()?;
        let tensors = state.iter().map(|(key, tensor)| (key.to_string(), RawTensor::from_state::<T>(tensor))).collect();
        let mut metadata = self.config.to_metadata();
        metadata.insert("format".into(), "pt".into());
        metadata.insert(CLASS_KEY.into(), self.kind.name().into());
        metadata.insert(DTYPE_KEY.into(), T::DTYPE.into());
        metadata.insert(TRAINING_KEY.into(), self.training.to_string());
        Ok(TensorFile { tensors, metadata })
    }

    /// A module of `kind` rebuilt from a state file: its recorded configuration, or for a file
    /// PyTorch wrote, the configuration its tensors imply with PyTorch's default eps and
    /// momentum; `overrides` replace either. Values of another float dtype are cast. The class
    /// a file records is not checked: the state dicts of the three kinds are the same, as in
    /// PyTorch.
    pub fn from_tensor_file(kind: Kind, file: &TensorFile, overrides: &ConfigOverrides) -> Result<Self> {
        let mut entries = Vec::with_capacity(file.tensors.len());
        for (name, tensor) in &file.tensors {
            entries.push((name.clone(), tensor.to_state(name)?));
        }
        let config = match Config::from_metadata(&file.metadata)? {
            Some(config) => config,
            None => Config::infer(&entries)?,
        };
        let mut module = BatchNorm::from_state(kind, config.with(overrides), &entries)?;
        module.training = file.metadata.get(TRAINING_KEY).is_none_or(|t| t == "true");
        Ok(module)
    }

    /// The class a state file written by this crate records.
    pub fn recorded_kind(file: &TensorFile) -> Option<Kind> {
        file.metadata.get(CLASS_KEY).and_then(|name| Kind::from_name(name))
    }

    /// Writes [`Self::to_tensor_file`] to `path`, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        state_file::save(path, &self.to_tensor_file()?)
    }

    /// Reads a module of `kind` from a state file (see [`Self::from_tensor_file`]).
    pub fn from_file(kind: Kind, path: impl AsRef<Path>, overrides: &ConfigOverrides) -> Result<Self> {
        BatchNorm::from_tensor_file(kind, &state_file::load(path)?, overrides)
    }
}

/// The CUDA backend: the same module with its arrays on a device.
#[cfg(feature = "cuda")]
impl<T: Element> BatchNorm<T> {
    /// The device the arrays live on; `None` on the CPU.
    pub fn device(&self) -> Option<&Arc<crate::cuda::Device>> {
        self.device.as_ref().map(DeviceArrays::device)
    }

    fn on_device(&mut self) -> Result<&mut DeviceArrays<T>> {
        self.device
            .as_mut()
            .ok_or_else(|| Error::InvalidArgument("expected tensors in host memory: this module is on the cpu".into()))
    }

    /// Moves the arrays to `device` (from the CPU or another device). The host arrays keep
    /// their memory, stale until [`Self::to_host`]. A move that fails changes nothing.
    pub fn to_device(&mut self, device: &Arc<crate::cuda::Device>) -> Result<()> {
        if self.device().is_some_and(|current| Arc::ptr_eq(current, device)) {
            return Ok(());
        }
        let mut values: Arrays<T> = Default::default();
        for which in Buffer::ALL {
            values[which.index()] = self.values_of(which)?;
        }
        self.device = Some(DeviceArrays::upload(device, self.config.num_features, &values)?);
        self.saved = None;
        Ok(())
    }

    /// Brings the arrays back into the host arrays' own memory, which views may reach.
    pub fn to_host(&mut self) -> Result<()> {
        if let Some(arrays) = &self.device {
            arrays.download_into(&mut self.host)?;
        }
        self.device = None;
        self.saved = None;
        Ok(())
    }

    /// The device memory of one of the module's arrays (`None` as for [`Self::buffer`], and on
    /// the CPU). A holder keeps it valid after the module moves or is dropped.
    pub fn device_buffer(&self, which: Buffer) -> Option<Arc<DeviceBuffer<T>>> {
        self.device.as_ref().filter(|_| self.holds(which)).and_then(|arrays| arrays.buffer(which))
    }

    /// The stream the last work on the module's arrays went to (the legacy default stream
    /// before any): device views of them are ready in that stream's order.
    pub fn last_stream(&self) -> Stream {
        self.device.as_ref().map_or(Stream::DEFAULT, DeviceArrays::last_stream)
    }

    /// The end of the last work queued on the module's arrays, if any: what a caller keeps the
    /// arrays of a call alive until, and orders other streams after.
    pub fn last_event(&self) -> Option<Arc<Event>> {
        self.device.as_ref().and_then(DeviceArrays::last_event)
    }

    /// Waits until all work queued on the module's arrays has finished (and reports a fault).
    pub fn synchronize(&self) -> Result<()> {
        self.device.as_ref().map_or(Ok(()), DeviceArrays::synchronize)
    }

    /// Queues the forward of `x` into `y` on `stream`, with the semantics of [`Self::forward`];
    /// the running statistics are updated on the device. A call that fails its checks changes
    /// nothing.
    ///
    /// # Safety
    /// `x` and `y` must be valid on the module's device per [`DeviceTensor`], and `stream` a
    /// stream of that device.
    pub unsafe fn forward_on_device(&mut self, x: DeviceTensor<T>, y: DeviceTensor<T>, stream: Stream) -> Result<()> {
        let plan = self.begin_forward(x.shape(), x.dims())?;
        check_same_dims("output", y.dims(), x.dims())?;
        check_same_storage("output", y.half_type(), x.half_type(), T::DTYPE)?;
        let config = self.config.clone();
        // SAFETY: the caller's guarantee.
        unsafe { self.on_device()?.forward(x, y, stream, plan, config.eps)? };
        self.end_forward(plan, Saved::Device { dims: x.dims(), from_batch: plan.batch_stats });
        Ok(())
    }

    /// Queues grad_input of the last forward into `dx` on `stream`, and adds the weight and bias
    /// gradients into the module's gradient arrays, as [`Self::backward`].
    ///
    /// # Safety
    /// As [`Self::forward_on_device`], for `x` (the last forward's input), `dy` and `dx`.
    pub unsafe fn backward_on_device(
        &mut self,
        x: DeviceTensor<T>,
        dy: DeviceTensor<T>,
        dx: DeviceTensor<T>,
        stream: Stream,
    ) -> Result<()> {
        let Some(Saved::Device { dims, from_batch }) = self.saved else { return Err(Error::NoForward) };
        for (what, tensor) in [("input", x), ("grad_output", dy), ("grad_input", dx)] {
            check_same_dims(what, tensor.dims(), dims)?;
            check_same_storage(what, tensor.half_type(), x.half_type(), T::DTYPE)?;
        }
        let accumulate = self.has_grad;
        // SAFETY: the caller's guarantee.
        unsafe { self.on_device()?.backward(x, dy, dx, stream, accumulate, from_batch)? };
        self.has_grad = self.config.affine;
        Ok(())
    }
}
