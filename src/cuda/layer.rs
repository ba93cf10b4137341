//! `BatchNorm2d` with its parameters and buffers on a GPU.
//!
//! The configuration, the mode, the batch counter and whether a gradient is held live in a host
//! [`BatchNorm2d`] (`host`), whose arrays are only refreshed from the device on request
//! ([`CudaBatchNorm2d::to_host`]); the arrays themselves live in device buffers that are allocated
//! once, so views handed out stay valid for the layer's lifetime.

use std::sync::Arc;

use super::backward::{backward, Gradients};
use super::device::Device;
use super::forward::{eval, train, Parameters};
use super::launch::Workspace;
use super::memory::{DeviceBuffer, DeviceTensor, Event, Stream};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::functional::{check_batch_size, check_eps};
use crate::layer::{BatchNorm2d, Buffer};
use crate::shape::Shape;

const ALL_BUFFERS: [Buffer; 6] =
    [Buffer::Weight, Buffer::Bias, Buffer::RunningMean, Buffer::RunningVar, Buffer::GradWeight, Buffer::GradBias];

/// What the last forward left for the backward (its statistics are in the workspace).
#[derive(Clone, Copy, Debug)]
struct Forwarded {
    shape: Shape,
    from_batch: bool,
}

/// A [`BatchNorm2d`] on a CUDA device.
pub struct CudaBatchNorm2d<T: Element> {
    host: BatchNorm2d<T>,
    device: Arc<Device>,
    /// Indexed like `ALL_BUFFERS`; `None` where the configuration has no such array. Shared with
    /// the views handed out of each array ([`Self::buffer_owner`]), which may outlive the layer.
    buffers: [Option<Arc<DeviceBuffer<T>>>; 6],
    workspace: Workspace,
    /// The end of the last work queued on this layer's state, and the stream it went to. Shared
    /// with the bindings, which order a call's arrays after the same event (one per call).
    last_work: Option<(Arc<Event>, Stream)>,
    forwarded: Option<Forwarded>,
}

/// Where `which` sits in `ALL_BUFFERS`.
fn slot(which: Buffer) -> usize {
    match which {
        Buffer::Weight => 0,
        Buffer::Bias => 1,
        Buffer::RunningMean => 2,
        Buffer::RunningVar => 3,
        Buffer::GradWeight => 4,
        Buffer::GradBias => 5,
    }
}

impl<T: Element> CudaBatchNorm2d<T> {
    /// The layer `host` (configuration, mode, parameters, buffers, gradients) copied to `device`.
    pub fn new(host: BatchNorm2d<T>, device: &Arc<Device>) -> Result<Self> {
        let channels = host.config().num_features;
        let mut buffers: [Option<Arc<DeviceBuffer<T>>>; 6] = Default::default();
        for (index, which) in ALL_BUFFERS.into_iter().enumerate() {
            if host.storage(which).is_some() {
                let values = host.buffer(which).map_or_else(|| vec![T::ZERO; channels], <[T]>::to_vec);
                buffers[index] = Some(Arc::new(DeviceBuffer::from_host(device, &values)?));
            }
        }
        Ok(CudaBatchNorm2d {
            workspace: Workspace::new(device, channels)?,
            host,
            device: device.clone(),
            buffers,
            last_work: None,
            forwarded: None,
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
    pub fn config(&self) -> &crate::Config {
        self.host.config()
    }
    pub fn is_training(&self) -> bool {
        self.host.is_training()
    }
    pub fn set_training(&mut self, training: bool) {
        self.host.set_training(training)
    }
    pub fn num_batches_tracked(&self) -> Option<i64> {
        self.host.num_batches_tracked()
    }

    /// The device address of one of the layer's (C,) arrays, as [`BatchNorm2d::buffer`] has it
    /// (no gradient before a backward). It stays valid while the layer lives.
    pub fn buffer_ptr(&self, which: Buffer) -> Option<u64> {
        let gradient = matches!(which, Buffer::GradWeight | Buffer::GradBias);
        if gradient && !self.host.has_grad() {
            return None;
        }
        self.buffers[slot(which)].as_ref().map(|buffer| buffer.ptr())
    }

    /// What keeps the memory of [`Self::buffer_ptr`] alive: a view holds it, so the array stays
    /// valid after the layer is dropped (a module moved back to the CPU) and is freed with the
    /// last view.
    pub fn buffer_owner(&self, which: Buffer) -> Option<Arc<DeviceBuffer<T>>> {
        self.buffer_ptr(which)?;
        self.buffers[slot(which)].clone()
    }

    /// The stream the last work on the layer's state went to (the legacy default stream before
    /// any): views of its buffers are ready in that stream's order.
    pub fn last_stream(&self) -> Stream {
        self.last_work.as_ref().map_or(Stream::DEFAULT, |(_, stream)| *stream)
    }

    /// The end of the last work queued on the layer (by the last forward or backward), if any.
    pub fn last_event(&self) -> Option<Arc<Event>> {
        self.last_work.as_ref().map(|(event, _)| event.clone())
    }

    /// Waits until all work queued on the layer's state has finished (and reports a fault in it).
    pub fn synchronize(&self) -> Result<()> {
        match &self.last_work {
            Some((event, _)) => event.wait(),
            None => Ok(()),
        }
    }

    /// A host copy of the layer: every array fetched from the device.
    pub fn to_host(&self) -> Result<BatchNorm2d<T>> {
        self.synchronize()?;
        let mut host = self.host.clone();
        for (index, which) in ALL_BUFFERS.into_iter().enumerate() {
            if let (Some(target), Some(buffer)) = (host.buffer_mut(which), &self.buffers[index]) {
                target.copy_from_slice(&buffer.to_host()?);
            }
        }
        Ok(host)
    }

    /// Replaces the layer's state with `host`'s (of the same configuration), copying its arrays
    /// to the device buffers in place.
    pub fn set_host(&mut self, host: BatchNorm2d<T>) -> Result<()> {
        if host.config() != self.host.config() {
            return Err(Error::InvalidArgument(format!(
                "cannot load a layer configured as {:?} into one configured as {:?}",
                host.config(),
                self.host.config()
            )));
        }
        self.synchronize()?;
        for (index, which) in ALL_BUFFERS.into_iter().enumerate() {
            if let (Some(values), Some(buffer)) = (host.buffer(which), self.buffers[index].as_deref()) {
                buffer.write(values)?;
            }
        }
        self.host = host;
        Ok(())
    }

    /// Copies `values` into one of the layer's (C,) arrays (an optimizer step from the host).
    pub fn write_buffer(&mut self, which: Buffer, values: &[T]) -> Result<()> {
        if self.buffer_ptr(which).is_none() {
            let reason = which.absent_when();
            return Err(Error::InvalidArgument(format!(
                "cannot assign {}: this module has none ({reason})",
                which.name()
            )));
        }
        self.synchronize()?;
        match self.buffers[slot(which)].as_deref() {
            Some(buffer) => {
                crate::functional::check_len(which.name(), values.len(), buffer.len())?;
                buffer.write(values)
            }
            None => Ok(()),
        }
    }

    fn pointer(&self, which: Buffer) -> u64 {
        self.buffers[slot(which)].as_ref().map_or(0, |buffer| buffer.ptr())
    }

    /// Orders `stream` after the previous work on this layer's state, when that went elsewhere.
    fn order_after_previous(&self, stream: Stream) -> Result<()> {
        match &self.last_work {
            Some((event, previous)) if *previous != stream => event.order_before(stream),
            _ => Ok(()),
        }
    }

    fn finish(&mut self, stream: Stream) -> Result<()> {
        self.last_work = Some((Arc::new(Event::record(&self.device, stream)?), stream));
        Ok(())
    }

    /// Queues the forward of `x` into `y` on `stream`, with the semantics of
    /// [`BatchNorm2d::forward`]; the running statistics are updated on the device. A call that
    /// fails its checks changes nothing.
    ///
    /// # Safety
    /// `x` and `y` must be valid on this layer's device per [`DeviceTensor`], and `stream` a
    /// stream of that device.
    pub unsafe fn forward(&mut self, x: DeviceTensor<T>, y: DeviceTensor<T>, stream: Stream) -> Result<()> {
        let shape = x.shape();
        self.host.check_channels(shape)?;
        if y.shape() != shape {
            return Err(Error::ShapeMismatch {
                what: "output".into(),
                expected: shape.dims().to_vec(),
                got: y.shape().dims().to_vec(),
            });
        }
        let plan = self.host.forward_plan();
        check_eps(self.host.config().eps, plan.batch_stats)?;
        if plan.batch_stats {
            check_batch_size(shape)?;
        }
        self.device.bind()?;
        self.order_after_previous(stream)?;
        let running = |which| if plan.updates || !plan.batch_stats { self.pointer(which) } else { 0 };
        let parameters = Parameters {
            weight: self.pointer(Buffer::Weight),
            bias: self.pointer(Buffer::Bias),
            running_mean: running(Buffer::RunningMean),
            running_var: running(Buffer::RunningVar),
            factor: plan.factor,
            eps: self.host.config().eps,
        };
        if shape.numel() > 0 {
            if plan.batch_stats {
                train(&self.device, stream, x, y, parameters, &self.workspace)?;
            } else {
                eval(&self.device, stream, x, y, parameters, &self.workspace)?;
            }
        }
        if plan.updates {
            self.host.count_batch();
        }
        self.forwarded = Some(Forwarded { shape, from_batch: plan.batch_stats });
        self.finish(stream)
    }

    /// Queues grad_input of the last forward into `dx` on `stream`, and adds the weight and bias
    /// gradients into the layer's gradient buffers, as [`BatchNorm2d::backward`].
    ///
    /// # Safety
    /// As [`Self::forward`], for `x` (the last forward's input), `dy` and `dx`.
    pub unsafe fn backward(
        &mut self,
        x: DeviceTensor<T>,
        dy: DeviceTensor<T>,
        dx: DeviceTensor<T>,
        stream: Stream,
    ) -> Result<()> {
        let forwarded = self.forwarded.ok_or(Error::NoForward)?;
        for (what, tensor) in [("input", x), ("grad_output", dy), ("grad_input", dx)] {
            if tensor.shape() != forwarded.shape {
                return Err(Error::ShapeMismatch {
                    what: format!("{what} (the last forward's input shape)"),
                    expected: forwarded.shape.dims().to_vec(),
                    got: tensor.shape().dims().to_vec(),
                });
            }
        }
        self.device.bind()?;
        self.order_after_previous(stream)?;
        let accumulate = self.host.has_grad();
        if forwarded.shape.numel() > 0 {
            let gradients = Gradients {
                weight: self.pointer(Buffer::Weight),
                grad_weight: self.pointer(Buffer::GradWeight),
                grad_bias: self.pointer(Buffer::GradBias),
                accumulate,
                from_batch: forwarded.from_batch,
            };
            backward(&self.device, stream, x, dy, dx, gradients, &self.workspace)?;
        } else if !accumulate {
            // An empty batch's gradients are zeros, which overwrite stale ones.
            self.finish(stream)?;
            self.synchronize()?;
            let zeros = vec![T::ZERO; self.host.config().num_features];
            for which in [Buffer::GradWeight, Buffer::GradBias] {
                if let Some(buffer) = self.buffers[slot(which)].as_deref() {
                    buffer.write(&zeros)?;
                }
            }
        }
        self.host.mark_backward();
        self.finish(stream)
    }
}
