//! A module's arrays on a CUDA device, and the launches that run on them: what
//! [`crate::BatchNorm`] holds while it is on a device. The configuration, mode and counters
//! stay in the module; this holds the device memory, the workspace and the order of the work.

use std::sync::Arc;

use super::backward::{backward, Gradients};
use super::device::Device;
use super::forward::{eval, train, Parameters};
use super::launch::Workspace;
use super::memory::{DeviceBuffer, DeviceTensor, Event, Stream};
use crate::config::Buffer;
use crate::element::Element;
use crate::error::Result;
use crate::module::{Arrays, ForwardPlan};

pub struct DeviceArrays<T: Element> {
    device: Arc<Device>,
    /// Indexed by [`Buffer::index`]; `None` where the configuration has no such array. Shared
    /// with the views handed out of each array ([`Self::buffer`]), which may outlive the module.
    buffers: [Option<Arc<DeviceBuffer<T>>>; 6],
    workspace: Workspace,
    /// The end of the last work queued on these arrays, and the stream it went to.
    /// Shared with the bindings, which order a call's arrays after the same event (one per call).
    last_work: Option<(Arc<Event>, Stream)>,
}

impl<T: Element> DeviceArrays<T> {
    /// The arrays `values` of a module of `channels` channels copied to `device`. The workspace
    /// is sized by `channels`: a module may hold no arrays at all (no affine parameters, no
    /// running statistics).
    pub(crate) fn upload(device: &Arc<Device>, channels: usize, values: &Arrays<T>) -> Result<Self> {
        let mut buffers: [Option<Arc<DeviceBuffer<T>>>; 6] = Default::default();
        for (slot, values) in buffers.iter_mut().zip(values) {
            if let Some(values) = values {
                *slot = Some(Arc::new(DeviceBuffer::from_host(device, values)?));
            }
        }
        Ok(DeviceArrays {
            workspace: Workspace::new(device, channels)?,
            device: device.clone(),
            buffers,
            last_work: None,
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Copies every array into `host`'s memory (of the same configuration).
    pub(crate) fn download_into(&self, host: &mut Arrays<T>) -> Result<()> {
        self.synchronize()?;
        for (target, buffer) in host.iter_mut().zip(&self.buffers) {
            if let (Some(target), Some(buffer)) = (target, buffer) {
                target.copy_from_slice(&buffer.to_host()?);
            }
        }
        Ok(())
    }

    /// A host copy of one array, after the work queued on it.
    pub(crate) fn read(&self, which: Buffer) -> Result<Option<Vec<T>>> {
        self.synchronize()?;
        self.buffers[which.index()].as_deref().map(DeviceBuffer::to_host).transpose()
    }

    /// Overwrites one array (of the configuration's length), after the work queued on it.
    pub(crate) fn write(&mut self, which: Buffer, values: &[T]) -> Result<()> {
        self.synchronize()?;
        match self.buffers[which.index()].as_deref() {
            Some(buffer) => buffer.write(values),
            None => Ok(()),
        }
    }

    /// What keeps one array's memory alive: a view holds it.
    pub(crate) fn buffer(&self, which: Buffer) -> Option<Arc<DeviceBuffer<T>>> {
        self.buffers[which.index()].clone()
    }

    pub(crate) fn last_stream(&self) -> Stream {
        self.last_work.as_ref().map_or(Stream::DEFAULT, |(_, stream)| *stream)
    }

    /// The end of the last work queued on the arrays (by the last forward or backward), if any.
    pub(crate) fn last_event(&self) -> Option<Arc<Event>> {
        self.last_work.as_ref().map(|(event, _)| event.clone())
    }

    /// Waits until all work queued on the arrays has finished (and reports a fault in it).
    pub(crate) fn synchronize(&self) -> Result<()> {
        match &self.last_work {
            Some((event, _)) => event.wait(),
            None => Ok(()),
        }
    }

    fn pointer(&self, which: Buffer) -> u64 {
        self.buffers[which.index()].as_ref().map_or(0, |buffer| buffer.ptr())
    }

    /// Orders `stream` after the previous work on these arrays, when that went elsewhere.
    fn begin(&self, stream: Stream) -> Result<()> {
        self.device.bind()?;
        match &self.last_work {
            Some((event, previous)) if *previous != stream => event.order_before(stream),
            _ => Ok(()),
        }
    }

    fn finish(&mut self, stream: Stream) -> Result<()> {
        self.last_work = Some((Arc::new(Event::record(&self.device, stream)?), stream));
        Ok(())
    }

    /// Queues the forward `plan` of `x` into `y` on `stream` (checked by the module).
    ///
    /// # Safety
    /// `x` and `y` must be valid on this device per [`DeviceTensor`], and `stream` a stream of it.
    pub(crate) unsafe fn forward(
        &mut self,
        x: DeviceTensor<T>,
        y: DeviceTensor<T>,
        stream: Stream,
        plan: ForwardPlan,
        eps: f64,
    ) -> Result<()> {
        self.begin(stream)?;
        let running = |which| if plan.updates || !plan.batch_stats { self.pointer(which) } else { 0 };
        let parameters = Parameters {
            weight: self.pointer(Buffer::Weight),
            bias: self.pointer(Buffer::Bias),
            running_mean: running(Buffer::RunningMean),
            running_var: running(Buffer::RunningVar),
            factor: plan.factor,
            eps,
        };
        if x.shape().numel() > 0 {
            // SAFETY: the caller's guarantee; the module's pointers are live device buffers.
            unsafe {
                if plan.batch_stats {
                    train(&self.device, stream, x, y, parameters, &self.workspace)?;
                } else {
                    eval(&self.device, stream, x, y, parameters, &self.workspace)?;
                }
            }
        }
        self.finish(stream)
    }

    /// Queues grad_input of the last forward into `dx` on `stream`, and writes (or, with
    /// `accumulate`, adds) the parameter gradients.
    ///
    /// # Safety
    /// As [`Self::forward`], for `x` (the last forward's input), `dy` and `dx`.
    pub(crate) unsafe fn backward(
        &mut self,
        x: DeviceTensor<T>,
        dy: DeviceTensor<T>,
        dx: DeviceTensor<T>,
        stream: Stream,
        accumulate: bool,
        from_batch: bool,
    ) -> Result<()> {
        self.begin(stream)?;
        if x.shape().numel() > 0 {
            let gradients = Gradients {
                weight: self.pointer(Buffer::Weight),
                grad_weight: self.pointer(Buffer::GradWeight),
                grad_bias: self.pointer(Buffer::GradBias),
                accumulate,
                from_batch,
            };
            // SAFETY: as in `forward`.
            unsafe { backward(&self.device, stream, x, dy, dx, gradients, &self.workspace)? };
        } else if !accumulate {
            // An empty batch's gradients are zeros, which overwrite stale ones.
            self.finish(stream)?;
            for which in [Buffer::GradWeight, Buffer::GradBias] {
                if let Some(buffer) = self.buffers[which.index()].clone() {
                    self.write(which, &vec![T::ZERO; buffer.len()])?;
                }
            }
        }
        self.finish(stream)
    }
}
