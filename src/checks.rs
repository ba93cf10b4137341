//! Every argument check, in one place: the module, the functional API and the bindings all call
//! these, so a rule and its message are written once.

use crate::config::Buffer;
#[cfg(feature = "cuda")]
use crate::convert::Half;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::shape::{Dims, Shape, TensorMut};

/// `num_features` of a module: at least one channel.
pub fn check_num_features(count: usize) -> Result<()> {
    if count == 0 {
        return Err(Error::InvalidArgument("num_features must be a positive integer, got 0".into()));
    }
    Ok(())
}

/// PyTorch 2.13's rule: normalizing by batch statistics needs eps > 0 (a constant channel would
/// divide by zero), by running statistics eps ≥ 0. As in PyTorch, NaN and infinity pass.
pub fn check_eps(eps: f64, batch_stats: bool) -> Result<()> {
    if batch_stats && eps <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "batch_norm eps must be positive during training, but got {eps:?}"
        )));
    }
    if eps < 0.0 {
        return Err(Error::InvalidArgument(format!("batch_norm eps must be non-negative, but got {eps:?}")));
    }
    Ok(())
}

/// A (C,) array of `got` values where `expected` are needed.
pub fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        return Ok(());
    }
    Err(Error::ShapeMismatch { what: what.to_string(), expected: vec![expected], got: vec![got] })
}

/// That `what` holds the values the input holds (`None`: the module's own `element` type; else a
/// half type): outputs and gradients come in the input's dtype, as in PyTorch. (Device tensors
/// carry their half type; host tensors are checked by type and `check_target`.)
#[cfg(feature = "cuda")]
pub fn check_same_storage(what: &str, got: Option<Half>, expected: Option<Half>, element: &str) -> Result<()> {
    if got == expected {
        return Ok(());
    }
    let name = |half: Option<Half>| half.map_or_else(|| element.to_string(), |h| h.name().to_string());
    Err(Error::DType { what: what.to_string(), expected: name(expected), got: name(got) })
}

/// Batch statistics need more than one value per channel.
pub fn check_batch_size(shape: Shape, dims: Dims) -> Result<()> {
    if shape.values_per_channel() == 1 {
        return Err(Error::TooFewValues { shape: dims.as_slice().to_vec() });
    }
    Ok(())
}

/// An input with `num_features` channels.
pub fn check_channels(num_features: usize, shape: Shape, dims: Dims) -> Result<()> {
    if shape.c != num_features {
        return Err(Error::ChannelMismatch { expected: num_features, got: shape.c, shape: dims.as_slice().to_vec() });
    }
    Ok(())
}

/// An output of `len` values for a result of `shape`.
pub fn check_output_len(shape: Shape, len: usize) -> Result<()> {
    if len != shape.numel() {
        return Err(Error::Length { what: "output", expected: shape.numel(), got: len });
    }
    Ok(())
}

/// Where a result of `shape` goes: as many values, and half values only from float32 (their
/// computation runs in float32 and narrows).
pub fn check_target<T: Element>(shape: Shape, target: &TensorMut<'_, T>) -> Result<()> {
    if target.is_half() && T::as_f32(&[]).is_none() {
        return Err(Error::DType {
            what: "output".into(),
            expected: T::DTYPE.into(),
            got: "float16 or bfloat16 (half output comes from float32 inputs and modules)".into(),
        });
    }
    check_output_len(shape, target.len())
}

/// An array of a backward (`what`) with the dims of the forward's input.
pub fn check_same_dims(what: &str, got: Dims, expected: Dims) -> Result<()> {
    if got.as_slice() == expected.as_slice() {
        return Ok(());
    }
    Err(Error::ShapeMismatch {
        what: format!("{what} (the forward input's shape)"),
        expected: expected.as_slice().to_vec(),
        got: got.as_slice().to_vec(),
    })
}

/// Whose memory a [`Span`] is, for error messages; named without allocating, since every call
/// builds these.
#[derive(Clone, Copy, Debug)]
pub enum Owner {
    Argument(&'static str),
    Module(Buffer),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Argument(what) => f.write_str(what),
            Owner::Module(buffer) => write!(f, "the module's {}", buffer.name()),
        }
    }
}

/// The bytes an array occupies, as addresses.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub owner: Owner,
    pub start: usize,
    pub end: usize,
}

impl Span {
    /// The bytes of a strided array of `dims` with `strides` (in bytes) whose first element of
    /// `item` bytes is at `base`.
    pub fn strided(owner: Owner, base: usize, dims: &[usize], strides: &[isize], item: usize) -> Span {
        if dims.contains(&0) {
            return Span { owner, start: base, end: base };
        }
        let (low, high) = extent(dims, strides);
        Span { owner, start: base.wrapping_add_signed(low), end: base.wrapping_add_signed(high).wrapping_add(item) }
    }

    pub fn of_slice<T>(owner: Owner, data: &[T]) -> Span {
        let range = data.as_ptr_range();
        Span { owner, start: range.start as usize, end: range.end as usize }
    }

    pub fn overlaps(&self, other: &Span) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// The lowest and highest offsets (in strides' units) a strided array reaches from its first
/// element.
pub fn extent(dims: &[usize], strides: &[isize]) -> (isize, isize) {
    let (mut low, mut high) = (0isize, 0isize);
    for (&dim, &stride) in dims.iter().zip(strides) {
        let reach = (dim as isize).saturating_sub(1).saturating_mul(stride);
        if reach < 0 {
            low = low.saturating_add(reach);
        } else {
            high = high.saturating_add(reach);
        }
    }
    (low, high)
}

/// An output that a call writes must share no memory with anything else it reads or writes (in
/// Rust the borrow rules see to it; the bindings' arrays need this check).
#[cfg(feature = "python")]
pub fn check_disjoint(output: &Span, others: &[Span]) -> Result<()> {
    match others.iter().find(|other| other.overlaps(output)) {
        Some(other) => Err(Error::BadOutput(format!("{} must not share memory with {}", output.owner, other.owner))),
        None => Ok(()),
    }
}
