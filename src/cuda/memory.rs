//! Device memory: buffers this crate owns, tensors it borrows, the streams it runs on and the
//! events that order work between them.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::result as driver;
use cudarc::driver::sys::{CUdeviceptr, CUevent, CUevent_flags, CUstream};

use super::device::{driver_error, Device};
use crate::element::Element;
use crate::error::Result;
use crate::shape::Shape;

/// A CUDA stream this crate borrows: it never creates or destroys one. Work is queued on it and
/// ordered after whatever the stream's owner queued before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stream(u64);

impl Stream {
    /// The legacy default stream: ordered with every blocking stream of the context (PyTorch's
    /// and CuPy's default streams included).
    pub const DEFAULT: Stream = Stream(0);

    /// A stream from its raw `CUstream` / `cudaStream_t` handle (1 and 2 are CUDA's legacy and
    /// per-thread default streams).
    ///
    /// # Safety
    /// `handle` must be a live stream of the device it is used with, for as long as it is used.
    pub unsafe fn from_raw(handle: u64) -> Stream {
        Stream(handle)
    }
    pub fn raw(self) -> u64 {
        self.0
    }
    pub(crate) fn cu(self) -> CUstream {
        self.0 as CUstream
    }
}

/// A C-contiguous (N, C, H, W) tensor of `T` in device memory that someone else owns (a CuPy
/// array, a PyTorch tensor, a [`DeviceBuffer`]).
#[derive(Clone, Copy, Debug)]
pub struct DeviceTensor<T> {
    ptr: u64,
    shape: Shape,
    element: PhantomData<T>,
}

impl<T: Element> DeviceTensor<T> {
    /// # Safety
    /// `ptr` must address `shape.numel()` values of `T` on the device it is used with, alive
    /// (and, for an output, written by nothing else) until the work queued on it has finished.
    pub unsafe fn from_raw(ptr: u64, shape: Shape) -> Self {
        DeviceTensor { ptr, shape, element: PhantomData }
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn shape(&self) -> Shape {
        self.shape
    }
}

/// An allocation on one device, freed on drop. Copies to and from the host are synchronous.
pub struct DeviceBuffer<T> {
    ptr: CUdeviceptr,
    len: usize,
    device: Arc<Device>,
    /// Allocated from the stream-ordered pool, and so freed through it.
    pooled: bool,
    element: PhantomData<T>,
}

impl<T: Element> DeviceBuffer<T> {
    /// `len` values, unset, for an output written on `stream`: from the device's stream-ordered
    /// pool where it has one (no device-wide synchronization, unlike cuMemAlloc and cuMemFree).
    pub fn for_output(device: &Arc<Device>, len: usize, stream: Stream) -> Result<Self> {
        if !device.context().has_async_alloc() {
            return Self::zeroed(device, len);
        }
        device.bind()?;
        let bytes = len.max(1) * std::mem::size_of::<T>();
        // SAFETY: a fresh allocation ordered on `stream`, which the caller's kernels write first.
        let ptr = unsafe { driver::malloc_async(stream.cu(), bytes) }
            .map_err(|e| driver_error("allocation (cuMemAllocAsync)", e))?;
        Ok(DeviceBuffer { ptr, len, device: device.clone(), pooled: true, element: PhantomData })
    }
}

/// Copies `len` values of `T` at device address `ptr` to the host, synchronously.
///
/// # Safety
/// `ptr` must address `len` values of `T` on `device`.
pub unsafe fn copy_to_host<T: Element>(device: &Device, ptr: u64, len: usize) -> Result<Vec<T>> {
    let mut values = vec![T::ZERO; len];
    device.bind()?;
    driver::memcpy_dtoh_sync(&mut values, ptr).map_err(|e| driver_error("copy from the device", e))?;
    Ok(values)
}

/// The ordinal of the device that owns device address `ptr`, or an error if it is not one.
pub fn device_of_pointer(ptr: u64) -> Result<usize> {
    super::library::driver()?;
    let mut ordinal: i32 = -1;
    // SAFETY: writes one int; the driver validates the pointer itself.
    unsafe {
        cudarc::driver::sys::cuPointerGetAttribute(
            (&mut ordinal as *mut i32).cast(),
            cudarc::driver::sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    }
    .result()
    .map_err(|e| driver_error(&format!("looking up the device of address {ptr:#x}"), e))?;
    Ok(ordinal.max(0) as usize)
}

impl<T: Copy + Default> DeviceBuffer<T> {
    /// `len` values of `T`, every byte zero.
    pub fn zeroed(device: &Arc<Device>, len: usize) -> Result<Self> {
        device.bind()?;
        // cuMemAlloc refuses 0 bytes; one element keeps every buffer a valid address.
        let bytes = len.max(1) * std::mem::size_of::<T>();
        // SAFETY: a fresh allocation of `bytes`, zeroed before anyone reads it.
        let ptr = unsafe { driver::malloc_sync(bytes) }.map_err(|e| driver_error("allocation (cuMemAlloc)", e))?;
        let buffer = DeviceBuffer { ptr, len, device: device.clone(), pooled: false, element: PhantomData };
        // SAFETY: `ptr` owns `bytes` bytes.
        unsafe { driver::memset_d8_sync(ptr, 0, bytes) }.map_err(|e| driver_error("memset", e))?;
        Ok(buffer)
    }

    pub fn from_host(device: &Arc<Device>, values: &[T]) -> Result<Self> {
        let buffer = Self::zeroed(device, values.len())?;
        buffer.write(values)?;
        Ok(buffer)
    }

    /// Overwrites the buffer with `values` (of its length). Shared access suffices: device
    /// memory is written through its address, as views of it (DLPack consumers) also do.
    pub fn write(&self, values: &[T]) -> Result<()> {
        assert_eq!(values.len(), self.len, "DeviceBuffer::write takes exactly the buffer's length");
        self.device.bind()?;
        // SAFETY: the buffer holds `len` values of `T`.
        unsafe { driver::memcpy_htod_sync(self.ptr, values) }.map_err(|e| driver_error("copy to the device", e))
    }

    pub fn to_host(&self) -> Result<Vec<T>> {
        let mut values = vec![T::default(); self.len];
        self.device.bind()?;
        // SAFETY: the buffer holds `len` values of `T`.
        unsafe { driver::memcpy_dtoh_sync(&mut values, self.ptr) }
            .map_err(|e| driver_error("copy from the device", e))?;
        Ok(values)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // A failure here (a context already torn down at exit) has nobody to report to.
        if self.device.bind().is_ok() {
            // SAFETY: freed once. cuMemFree waits for all work; a pooled buffer goes back to the
            // pool in the default stream's order, after the work of every blocking stream.
            let _ = unsafe {
                if self.pooled {
                    driver::free_async(self.ptr, Stream::DEFAULT.cu())
                } else {
                    driver::free_sync(self.ptr)
                }
            };
        }
    }
}

/// A point in a stream's work that other streams, or the host, can wait for.
pub struct Event {
    raw: CUevent,
    device: Arc<Device>,
}

// SAFETY: CUDA events may be used from any thread once created.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    /// Marks the end of the work queued on `stream` so far.
    pub fn record(device: &Arc<Device>, stream: Stream) -> Result<Event> {
        device.bind()?;
        let raw = driver::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| driver_error("event creation", e))?;
        let event = Event { raw, device: device.clone() };
        // SAFETY: both handles are live; the stream is the caller's, per `Stream::from_raw`.
        unsafe { driver::event::record(event.raw, stream.cu()) }.map_err(|e| driver_error("event record", e))?;
        Ok(event)
    }

    /// Makes `stream` wait for this event without blocking the host.
    pub fn order_before(&self, stream: Stream) -> Result<()> {
        self.device.bind()?;
        // SAFETY: both handles are live.
        unsafe {
            driver::stream::wait_event(
                stream.cu(),
                self.raw,
                cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| driver_error("stream wait", e))
    }

    /// Blocks the host until the event has happened; reports a kernel fault as an error.
    pub fn wait(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the handle is live.
        unsafe { driver::event::synchronize(self.raw) }.map_err(|e| driver_error("waiting for the GPU", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: created in `record`, destroyed once (CUDA defers it until the event happens).
            let _ = unsafe { driver::event::destroy(self.raw) };
        }
    }
}
