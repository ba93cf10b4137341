//! Device memory: buffers this crate owns, tensors it borrows, the streams it runs on and the
//! events that order work between them.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::driver::result as driver;
use cudarc::driver::sys::{CUdeviceptr, CUevent, CUevent_flags, CUstream};

use super::device::{driver_error, Backend, Device, Emulator, GUARD, GUARD_BYTE};
use crate::convert::Half;
use crate::element::Element;
use crate::error::Result;
use crate::shape::{Dims, Ranks, Shape};

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

/// A C-contiguous (N, C, *) tensor in device memory that someone else owns (a CuPy array, a
/// PyTorch tensor, a [`DeviceBuffer`]): values of `T`, or, on a float32 module, float16 or
/// bfloat16 values that the kernels widen as they read and round once as they write (PyTorch's
/// mixed precision; see [`DeviceTensor::half`]).
#[derive(Clone, Copy, Debug)]
pub struct DeviceTensor<T> {
    ptr: u64,
    shape: Shape,
    dims: Dims,
    half: Option<Half>,
    element: PhantomData<T>,
}

impl<T: Element> DeviceTensor<T> {
    /// # Safety
    /// `ptr` must address `shape.numel()` values of `T` on the device it is used with, alive
    /// (and, for an output, written by nothing else) until the work queued on it has finished.
    pub unsafe fn from_raw(ptr: u64, shape: Shape) -> Self {
        DeviceTensor { ptr, shape, dims: shape.as_dims(), half: None, element: PhantomData }
    }

    /// A C-contiguous tensor of `dims` (N, C, *), read as `ranks` says.
    ///
    /// # Safety
    /// As [`Self::from_raw`].
    pub unsafe fn contiguous(ptr: u64, dims: &[usize], ranks: Ranks) -> Result<Self> {
        let shape = Shape::of_contiguous(dims, ranks, "input")?;
        Ok(DeviceTensor { ptr, shape, dims: Dims::new(dims, ranks), half: None, element: PhantomData })
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn shape(&self) -> Shape {
        self.shape
    }
    /// The dimensions as the caller gave them.
    pub fn dims(&self) -> Dims {
        self.dims
    }
    /// The half type its values are stored in, if they are not `T`s.
    pub fn half_type(&self) -> Option<Half> {
        self.half
    }
}

impl DeviceTensor<f32> {
    /// A C-contiguous tensor of `dims` holding `half` values, for a float32 module.
    ///
    /// # Safety
    /// As [`Self::from_raw`], for `shape.numel()` half values.
    pub unsafe fn half(ptr: u64, dims: &[usize], ranks: Ranks, half: Half) -> Result<Self> {
        // SAFETY: the caller's guarantee.
        Ok(DeviceTensor { half: Some(half), ..unsafe { Self::contiguous(ptr, dims, ranks)? } })
    }
}

/// An allocation on one device, freed on drop. Copies to and from the host are synchronous.
pub struct DeviceBuffer<T> {
    ptr: CUdeviceptr,
    len: usize,
    device: Arc<Device>,
    /// Allocated from the stream-ordered pool, and so freed through it.
    pooled: bool,
    /// The end of the last work that wrote it (see [`Self::written_by`]): a pooled buffer goes
    /// back to the pool only after it.
    last_write: Mutex<Option<Arc<Event>>>,
    element: PhantomData<T>,
}

impl<T: bytemuck::Pod> DeviceBuffer<T> {
    /// `len` values, unset, for an output written on `stream`: from the device's stream-ordered
    /// pool where it has one (no device-wide synchronization, unlike cuMemAlloc and cuMemFree).
    pub fn for_output(device: &Arc<Device>, len: usize, stream: Stream) -> Result<Self> {
        let Backend::Driver { context, .. } = &device.backend else { return Self::unset(device, len) };
        if !context.has_async_alloc() {
            return Self::unset(device, len);
        }
        device.bind()?;
        let bytes = byte_len::<T>(len)?;
        // SAFETY: a fresh allocation ordered on `stream`, which the caller's kernels write first.
        let ptr = unsafe { driver::malloc_async(stream.cu(), bytes) }
            .map_err(|e| driver_error("allocation (cuMemAllocAsync)", e))?;
        Ok(DeviceBuffer {
            ptr,
            len,
            device: device.clone(),
            pooled: true,
            last_write: Mutex::new(None),
            element: PhantomData,
        })
    }
}

/// The bytes of `len` values of `T`, at least one value's: cuMemAlloc refuses 0 bytes, and one
/// element keeps every buffer a valid address.
fn byte_len<T>(len: usize) -> Result<usize> {
    len.max(1)
        .checked_mul(size_of::<T>())
        .ok_or_else(|| crate::Error::Memory(format!("a device buffer of {len} values does not fit the address space")))
}

/// Copies `len` values of `T` at device address `ptr` to the host, synchronously.
///
/// # Safety
/// `ptr` must address `len` values of `T` on `device`.
pub unsafe fn copy_to_host<T: bytemuck::Pod>(device: &Device, ptr: u64, len: usize) -> Result<Vec<T>> {
    let mut values = vec![T::zeroed(); len];
    device.copy_out(ptr, bytemuck::cast_slice_mut(&mut values))?;
    Ok(values)
}

/// What a fresh allocation holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Zeros,
    /// Whatever the memory held: the caller's kernels write it before anything reads it. The
    /// emulator fills it with 0xFF bytes (NaN in float32 and float64, a huge count in an
    /// integer), so a kernel that reads a value nobody wrote shows in its results.
    Unset,
}

impl Device {
    fn alloc(&self, bytes: usize, fill: Fill) -> Result<u64> {
        match &self.backend {
            Backend::Driver { .. } => {
                self.bind()?;
                // SAFETY: a fresh allocation of `bytes`; zeroed below unless the caller writes it first.
                let ptr =
                    unsafe { driver::malloc_sync(bytes) }.map_err(|e| driver_error("allocation (cuMemAlloc)", e))?;
                if fill == Fill::Zeros {
                    // SAFETY: `ptr` owns `bytes` bytes.
                    if let Err(e) = unsafe { driver::memset_d8_sync(ptr, 0, bytes) } {
                        // SAFETY: allocated above, freed once.
                        let _ = unsafe { driver::free_sync(ptr) };
                        return Err(driver_error("memset", e));
                    }
                }
                Ok(ptr)
            }
            Backend::Emulator(emulator) => emulator.alloc(bytes, fill),
        }
    }

    /// # Safety
    /// `ptr` must be an allocation of this device's, freed once; `pooled` if it came from the
    /// stream-ordered pool.
    unsafe fn free(&self, ptr: u64, pooled: bool) {
        match &self.backend {
            Backend::Driver { .. } => {
                // A failure here (a context already torn down at exit) has nobody to report to.
                if self.bind().is_ok() {
                    // cuMemFree waits for all work; a pooled buffer goes back to the pool in the
                    // default stream's order, after the work of every blocking stream.
                    let _ = if pooled { driver::free_async(ptr, Stream::DEFAULT.cu()) } else { driver::free_sync(ptr) };
                }
            }
            Backend::Emulator(emulator) => emulator.free(ptr),
        }
    }

    /// Copies `bytes` to device address `ptr`, synchronously.
    ///
    /// # Safety
    /// `ptr` must address `bytes.len()` bytes of this device's memory.
    unsafe fn copy_in(&self, ptr: u64, bytes: &[u8]) -> Result<()> {
        match &self.backend {
            Backend::Driver { .. } => {
                self.bind()?;
                driver::memcpy_htod_sync(ptr, bytes).map_err(|e| driver_error("copy to the device", e))
            }
            Backend::Emulator(_) => {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr as *mut u8, bytes.len());
                Ok(())
            }
        }
    }

    /// Copies from device address `ptr` into `bytes`, synchronously.
    ///
    /// # Safety
    /// `ptr` must address `bytes.len()` bytes of this device's memory.
    unsafe fn copy_out(&self, ptr: u64, bytes: &mut [u8]) -> Result<()> {
        match &self.backend {
            Backend::Driver { .. } => {
                self.bind()?;
                driver::memcpy_dtoh_sync(bytes, ptr).map_err(|e| driver_error("copy from the device", e))
            }
            Backend::Emulator(_) => {
                std::ptr::copy_nonoverlapping(ptr as *const u8, bytes.as_mut_ptr(), bytes.len());
                Ok(())
            }
        }
    }
}

impl Emulator {
    fn layout(bytes: usize) -> Result<std::alloc::Layout> {
        let total = bytes.checked_add(2 * GUARD);
        total
            .and_then(|total| std::alloc::Layout::from_size_align(total, GUARD).ok())
            .ok_or_else(|| crate::Error::Memory(format!("an emulated allocation of {bytes} bytes")))
    }

    fn alloc(&self, bytes: usize, fill: Fill) -> Result<u64> {
        let layout = Self::layout(bytes)?;
        // SAFETY: the layout is not zero-sized (it holds the guards).
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            return Err(crate::Error::Memory(format!("an emulated allocation of {bytes} bytes")));
        }
        // SAFETY: the guards lie inside the allocation, before and after its `bytes`.
        unsafe {
            std::ptr::write_bytes(base, GUARD_BYTE, GUARD);
            std::ptr::write_bytes(base.add(GUARD + bytes), GUARD_BYTE, GUARD);
            if fill == Fill::Unset {
                std::ptr::write_bytes(base.add(GUARD), 0xFF, bytes);
            }
            self.fence(base, GUARD, bytes);
        }
        let ptr = base as u64 + GUARD as u64;
        self.allocations.lock().unwrap_or_else(|p| p.into_inner()).insert(ptr, bytes);
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        let bytes = self.allocations.lock().unwrap_or_else(|p| p.into_inner()).remove(&ptr);
        if let Some((bytes, layout)) = bytes.and_then(|bytes| Some((bytes, Self::layout(bytes).ok()?))) {
            // SAFETY: allocated by `alloc` with this layout, at `ptr - GUARD`.
            unsafe {
                let base = (ptr as usize - GUARD) as *mut u8;
                self.unfence(base, GUARD, bytes);
                std::alloc::dealloc(base, layout)
            };
        }
    }
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

impl<T: bytemuck::Pod> DeviceBuffer<T> {
    /// `len` values of `T`, every byte zero.
    pub fn zeroed(device: &Arc<Device>, len: usize) -> Result<Self> {
        Self::alloc(device, len, Fill::Zeros)
    }

    /// `len` values of `T`, unset: for memory that kernels write before anything reads it (on
    /// the emulator every byte is 0xFF, NaN for floats, so reading it first shows).
    pub fn unset(device: &Arc<Device>, len: usize) -> Result<Self> {
        Self::alloc(device, len, Fill::Unset)
    }

    fn alloc(device: &Arc<Device>, len: usize, fill: Fill) -> Result<Self> {
        let ptr = device.alloc(byte_len::<T>(len)?, fill)?;
        Ok(DeviceBuffer {
            ptr,
            len,
            device: device.clone(),
            pooled: false,
            last_write: Mutex::new(None),
            element: PhantomData,
        })
    }

    pub fn from_host(device: &Arc<Device>, values: &[T]) -> Result<Self> {
        let buffer = Self::unset(device, values.len())?;
        buffer.write(values)?;
        Ok(buffer)
    }

    /// Overwrites the buffer with `values` (of its length). Shared access suffices: device
    /// memory is written through its address, as views of it (DLPack consumers) also do.
    pub fn write(&self, values: &[T]) -> Result<()> {
        assert_eq!(values.len(), self.len, "DeviceBuffer::write takes exactly the buffer's length");
        // SAFETY: the buffer holds `len` values of `T`.
        unsafe { self.device.copy_in(self.ptr, bytemuck::cast_slice(values)) }
    }

    pub fn to_host(&self) -> Result<Vec<T>> {
        let mut values = vec![T::zeroed(); self.len];
        // SAFETY: the buffer holds `len` values of `T`.
        unsafe { self.device.copy_out(self.ptr, bytemuck::cast_slice_mut(&mut values)) }?;
        Ok(values)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// The buffer as a C-contiguous tensor of `dims`, as they were read.
    pub fn tensor(&self, dims: Dims) -> Result<DeviceTensor<T>> {
        let shape = Shape::of_contiguous(dims.as_slice(), dims.read_as(), "input")?;
        crate::checks::check_output_len(shape, self.len)?;
        Ok(DeviceTensor { ptr: self.ptr, shape, dims, half: None, element: PhantomData })
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

impl DeviceBuffer<u16> {
    /// The buffer's `half` values (as bits) as a C-contiguous tensor of `dims`, for a float32
    /// module.
    pub fn half_tensor(&self, dims: Dims, half: Half) -> Result<DeviceTensor<f32>> {
        let shape = Shape::of_contiguous(dims.as_slice(), dims.read_as(), "input")?;
        crate::checks::check_output_len(shape, self.len)?;
        Ok(DeviceTensor { ptr: self.ptr, shape, dims, half: Some(half), element: PhantomData })
    }
}

impl<T> DeviceBuffer<T> {
    /// Records that the work up to `event` writes the buffer. A pooled buffer is freed in the
    /// legacy default stream's order; that stream then waits for `event` first, so an array
    /// written on another stream and dropped early is never reallocated under its kernels. The
    /// event, not the writer's stream, is what the free waits on: the stream may be gone by then.
    pub fn written_by(&self, event: Arc<Event>) {
        *self.last_write.lock().unwrap_or_else(|p| p.into_inner()) = Some(event);
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let Some(event) = self.last_write.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            // Nobody to report a failure to; the free below then waits as cuMemFreeAsync does.
            let _ = event.order_before(Stream::DEFAULT);
        }
        // SAFETY: allocated by this buffer, freed once.
        unsafe { self.device.free(self.ptr, self.pooled) };
    }
}

/// A point in a stream's work that other streams, or the host, can wait for. The emulator runs
/// every launch to completion, so its events have happened when they are recorded.
pub struct Event {
    raw: Option<CUevent>,
    device: Arc<Device>,
}

// SAFETY: CUDA events may be used from any thread once created.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    /// Marks the end of the work queued on `stream` so far.
    pub fn record(device: &Arc<Device>, stream: Stream) -> Result<Event> {
        if let Backend::Emulator(_) = device.backend {
            return Ok(Event { raw: None, device: device.clone() });
        }
        device.bind()?;
        let raw = driver::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| driver_error("event creation", e))?;
        let event = Event { raw: Some(raw), device: device.clone() };
        // SAFETY: both handles are live; the stream is the caller's, per `Stream::from_raw`.
        unsafe { driver::event::record(raw, stream.cu()) }.map_err(|e| driver_error("event record", e))?;
        Ok(event)
    }

    /// Makes `stream` wait for this event without blocking the host.
    pub fn order_before(&self, stream: Stream) -> Result<()> {
        let Some(raw) = self.raw else { return Ok(()) };
        self.device.bind()?;
        // SAFETY: both handles are live.
        unsafe {
            driver::stream::wait_event(stream.cu(), raw, cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
        }
        .map_err(|e| driver_error("stream wait", e))
    }

    /// Whether the work before the event has finished (without waiting); reports a kernel fault.
    pub fn is_done(&self) -> Result<bool> {
        let Some(raw) = self.raw else { return Ok(true) };
        self.device.bind()?;
        // SAFETY: the handle is live.
        match unsafe { driver::event::query(raw) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(driver_error("querying an event", e)),
        }
    }

    /// Blocks the host until the event has happened; reports a kernel fault as an error.
    pub fn wait(&self) -> Result<()> {
        let Some(raw) = self.raw else { return Ok(()) };
        self.device.bind()?;
        // SAFETY: the handle is live.
        unsafe { driver::event::synchronize(raw) }.map_err(|e| driver_error("waiting for the GPU", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Some(raw) = self.raw {
            if self.device.bind().is_ok() {
                // SAFETY: created in `record`, destroyed once (CUDA defers it until the event happens).
                let _ = unsafe { driver::event::destroy(raw) };
            }
        }
    }
}
