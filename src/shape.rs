//! Shapes and strided views of (N, C, H, W) tensors.
//!
//! A channel's values are addressed by a *logical position* `0..values_per_channel()`, in
//! (n, h, w) order, i.e. image n and offset w = h·W + w within the plane. Kernels walk planes in
//! blocks; [`TensorRef::read`] hands each block over as a slice, borrowed in place when the memory
//! is contiguous and gathered into a small buffer when it is not (channels-last, Fortran order,
//! negative strides).

use crate::convert::{self, Half};
use crate::element::Element;
use crate::error::{shape_str, Error, Result};

/// Which input ranks a call accepts, and how it reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ranks {
    /// BatchNorm1d: (N, C) or (N, C, L).
    Sequence,
    /// BatchNorm2d: (N, C, H, W), or an unbatched (C, H, W).
    Planes,
    /// BatchNorm3d: (N, C, D, H, W).
    Volumes,
    /// `torch.nn.functional.batch_norm`: (N, C, *) with 0 to 3 spatial dimensions; a 3D
    /// input is (N, C, L).
    Any,
}

impl Ranks {
    /// Whether an input of `rank` dimensions is one of these.
    pub const fn accepts(self, rank: usize) -> bool {
        match self {
            Ranks::Sequence => matches!(rank, 2 | 3),
            Ranks::Planes => matches!(rank, 3 | 4),
            Ranks::Volumes => rank == 5,
            Ranks::Any => 2 <= rank && rank <= 5,
        }
    }

    /// Whether a 3D input is an unbatched (C, H, W) rather than (N, C, L).
    const fn unbatched(self, rank: usize) -> bool {
        matches!(self, Ranks::Planes) && rank == 3
    }

    /// What an error message says was expected.
    pub const fn expected(self) -> &'static str {
        match self {
            Ranks::Sequence => "2D or 3D: (N, C) or (N, C, L)",
            Ranks::Planes => "4D (N, C, H, W) or 3D unbatched (C, H, W)",
            Ranks::Volumes => "5D (N, C, D, H, W)",
            Ranks::Any => "2D to 5D (N, C, *)",
        }
    }
}

/// The dimensions of a tensor as its caller gave them (2 to 5), and how they were read: what
/// rank checks and error messages see. Kernels see the (N, C, H, W) [`Shape`] they map to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    values: [usize; 5],
    rank: usize,
    read_as: Ranks,
}

impl Dims {
    pub(crate) fn new(dims: &[usize], read_as: Ranks) -> Dims {
        let mut values = [0; 5];
        let rank = dims.len().min(5);
        values[..rank].copy_from_slice(&dims[..rank]);
        Dims { values, rank, read_as }
    }

    pub fn as_slice(&self) -> &[usize] {
        &self.values[..self.rank]
    }

    /// How the dims were read.
    pub fn read_as(&self) -> Ranks {
        self.read_as
    }

    /// Whether a call reading its inputs as `ranks` takes these dims, read the same way (a 3D
    /// input is (N, C, L) everywhere but in BatchNorm2d, where it is an unbatched (C, H, W)).
    pub fn fit(&self, ranks: Ranks) -> bool {
        ranks.accepts(self.rank) && ranks.unbatched(self.rank) == self.read_as.unbatched(self.rank)
    }

    /// The error for dims that do not [`Self::fit`] `ranks`.
    pub fn rank_error(&self, what: &'static str, ranks: Ranks) -> Error {
        Error::Rank { what, expected: ranks.expected(), got: self.as_slice().to_vec() }
    }
}

/// The dimensions of an (N, C, H, W) tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub const fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        Shape { n, c, h, w }
    }

    /// Accepts (N, C, H, W), or an unbatched (C, H, W) taken as N = 1.
    pub fn from_dims(dims: &[usize]) -> Result<Self> {
        Self::of_contiguous(dims, Ranks::Planes, "input")
    }

    /// The (N, C, H, W) shape of a C-contiguous array of `dims`, read as `ranks` says (see
    /// [`Self::view_of`]; a C-contiguous array's spatial dimensions always nest).
    pub fn of_contiguous(dims: &[usize], ranks: Ranks, what: &'static str) -> Result<Self> {
        let mut strides = vec![1isize; dims.len()];
        for axis in (0..dims.len().saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1].saturating_mul(dims[axis + 1].max(1) as isize);
        }
        match Self::view_of(dims, &strides, ranks, what)? {
            Some((shape, _)) => Ok(shape),
            None => Err(Error::InvalidArgument(format!("{what} of shape {} has no view", shape_str(dims)))),
        }
    }

    /// The (N, C, H, W) form of an array of `dims` with element `strides`, read as `ranks` says,
    /// with the strides of that form: (N, C) is (N, C, 1, 1), (N, C, L) is (N, C, 1, L), and
    /// (N, C, D, H, W) merges two neighbouring spatial dimensions. `None` when no two of D, H, W
    /// nest in memory, so the array must be copied (C-contiguous) first.
    pub fn view_of(
        dims: &[usize],
        strides: &[isize],
        ranks: Ranks,
        what: &'static str,
    ) -> Result<Option<(Shape, [isize; 4])>> {
        let rank_error = || Error::Rank { what, expected: ranks.expected(), got: dims.to_vec() };
        if strides.len() != dims.len() {
            return Err(rank_error());
        }
        let view = match (ranks, dims.len()) {
            (Ranks::Planes | Ranks::Any, 4) => {
                Some((Shape::new(dims[0], dims[1], dims[2], dims[3]), [strides[0], strides[1], strides[2], strides[3]]))
            }
            (Ranks::Planes, 3) => {
                Some((Shape::new(1, dims[0], dims[1], dims[2]), [0, strides[0], strides[1], strides[2]]))
            }
            (Ranks::Sequence | Ranks::Any, 2) => {
                Some((Shape::new(dims[0], dims[1], 1, 1), [strides[0], strides[1], 1, 1]))
            }
            (Ranks::Sequence | Ranks::Any, 3) => {
                Some((Shape::new(dims[0], dims[1], 1, dims[2]), [strides[0], strides[1], 1, strides[2]]))
            }
            (Ranks::Volumes | Ranks::Any, 5) => {
                let [n, c, d, h, w] = [dims[0], dims[1], dims[2], dims[3], dims[4]];
                let [sn, sc, sd, sh, sw] = [strides[0], strides[1], strides[2], strides[3], strides[4]];
                let too_large =
                    || Error::InvalidArgument(format!("a tensor of shape {} is too large", shape_str(dims)));
                if d <= 1 || h <= 1 || sd == h as isize * sh {
                    let merged = d.checked_mul(h).ok_or_else(too_large)?;
                    Some((Shape::new(n, c, merged, w), [sn, sc, if h <= 1 { sd } else { sh }, sw]))
                } else if w <= 1 || sh == w as isize * sw {
                    let merged = h.checked_mul(w).ok_or_else(too_large)?;
                    Some((Shape::new(n, c, d, merged), [sn, sc, sd, if w <= 1 { sh } else { sw }]))
                } else {
                    None
                }
            }
            _ => return Err(rank_error()),
        };
        Ok(view)
    }

    pub const fn dims(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    /// The shape as 4D dims.
    pub fn as_dims(&self) -> Dims {
        Dims::new(&self.dims(), Ranks::Planes)
    }

    pub const fn channels(&self) -> usize {
        self.c
    }

    /// Values in one (n, c) image plane: H·W.
    pub const fn plane(&self) -> usize {
        self.h * self.w
    }

    /// Values a channel's statistics run over: N·H·W.
    pub const fn values_per_channel(&self) -> usize {
        self.n * self.h * self.w
    }

    pub const fn numel(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Checks that every count derived from the shape (elements, values per channel, and their
    /// sizes in bytes of `T`) fits the address space, so the unchecked accessors above are exact.
    /// Every [`TensorRef`] has passed it.
    pub fn check_size<T>(&self) -> Result<()> {
        let per_channel = self.n.checked_mul(self.h).and_then(|v| v.checked_mul(self.w));
        let numel = per_channel.and_then(|v| v.checked_mul(self.c));
        let addressable = |count: Option<usize>| {
            count.and_then(|v| v.checked_mul(size_of::<T>().max(1))).is_some_and(|bytes| bytes <= isize::MAX as usize)
        };
        if addressable(per_channel) && addressable(numel) {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "a tensor of shape {} is too large: its size in bytes does not fit the address space",
            shape_str(&self.dims())
        )))
    }

    /// Strides, in elements, of the C-contiguous layout.
    pub const fn contiguous_strides(&self) -> [isize; 4] {
        let w = 1;
        let h = self.w as isize;
        let c = (self.h * self.w) as isize;
        let n = (self.c * self.h * self.w) as isize;
        [n, c, h, w]
    }

    /// Index in the C-contiguous layout of offset `w` in plane (n, c).
    #[inline(always)]
    pub(crate) fn contiguous_index(&self, n: usize, c: usize, w: usize) -> usize {
        (n * self.c + c) * self.plane() + w
    }
    /// Where value `w` of plane (n, c) sits in a channels-last (N, S, C) buffer.
    pub(crate) fn channels_last_index(&self, n: usize, c: usize, w: usize) -> usize {
        (n * self.plane() + w) * self.c + c
    }
}

/// A read-only view of an (N, C, H, W) tensor with arbitrary strides (in elements, possibly
/// negative or zero) into a slice. Construction checks that every element lies inside the slice,
/// so reads never go out of bounds.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a, T> {
    data: &'a [T],
    offset: usize,
    shape: Shape,
    strides: [isize; 4],
    /// The longest stretch of logical positions with a constant address step: (length, step).
    run: (usize, isize),
    dims: Dims,
    /// Half values (their bits) that reads widen to f32, in place of `data` (see [`TensorRef::half`]).
    half: Option<(&'a [u16], Half)>,
}

impl<'a, T: Element> TensorRef<'a, T> {
    /// A C-contiguous tensor: `data.len()` must equal `shape.numel()`.
    pub fn contiguous(data: &'a [T], shape: Shape) -> Result<Self> {
        shape.check_size::<T>()?;
        if data.len() != shape.numel() {
            return Err(Error::Length { what: "data for the shape", expected: shape.numel(), got: data.len() });
        }
        Self::strided(data, 0, shape, shape.contiguous_strides())
    }

    /// A strided tensor whose element (n, c, h, w) is
    /// `data[offset + n·s0 + c·s1 + h·s2 + w·s3]`.
    pub fn strided(data: &'a [T], offset: usize, shape: Shape, strides: [isize; 4]) -> Result<Self> {
        Self::over(data, data.len(), offset, shape, strides)
    }

    /// A strided view of `len` values (those of `data`, or of half storage).
    fn over(data: &'a [T], len: usize, offset: usize, shape: Shape, strides: [isize; 4]) -> Result<Self> {
        shape.check_size::<T>()?;
        if shape.numel() > 0 {
            let (mut lowest, mut highest) = (offset as i128, offset as i128);
            for (&dim, &stride) in shape.dims().iter().zip(&strides) {
                let reach = (dim as i128 - 1) * stride as i128;
                if reach < 0 {
                    lowest += reach;
                } else {
                    highest += reach;
                }
            }
            if lowest < 0 || highest >= len as i128 {
                return Err(Error::OutOfBounds { what: "strided view", lowest, highest, len });
            }
        }
        let [_, _, sh, sw] = strides;
        // A plane whose rows follow each other at the column step is one run (contiguous planes,
        // channels-last); otherwise each row is.
        let run = if shape.w <= 1 {
            (shape.plane(), if shape.h <= 1 { 1 } else { sh })
        } else if shape.h <= 1 || sh == shape.w as isize * sw {
            (shape.plane(), sw)
        } else {
            (shape.w, sw)
        };
        Ok(TensorRef { data, offset, shape, strides, run, dims: shape.as_dims(), half: None })
    }

    /// A tensor of `dims` (N, C, *) with element `strides`, read as `ranks` says (see
    /// [`Shape::view_of`]), whose first element is `data[offset]`. A 5D tensor none of whose
    /// spatial dimensions nest in memory cannot be viewed: copy it C-contiguous first.
    pub fn new(data: &'a [T], offset: usize, dims: &[usize], strides: &[isize], ranks: Ranks) -> Result<Self> {
        let Some((shape, strides)) = Shape::view_of(dims, strides, ranks, "input")? else {
            return Err(Error::InvalidArgument(format!(
                "an input of shape {} whose spatial strides do not nest cannot be read in place: copy it \
                 C-contiguous first",
                shape_str(dims)
            )));
        };
        let view = Self::strided(data, offset, shape, strides)?;
        Ok(TensorRef { dims: Dims::new(dims, ranks), ..view })
    }

    /// A C-contiguous tensor of `dims`, read as `ranks` says.
    pub fn contiguous_dims(data: &'a [T], dims: &[usize], ranks: Ranks) -> Result<Self> {
        let shape = Shape::of_contiguous(dims, ranks, "input")?;
        let view = Self::contiguous(data, shape)?;
        Ok(TensorRef { dims: Dims::new(dims, ranks), ..view })
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The dimensions as the caller gave them.
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// Whether the memory is laid out exactly as a C-contiguous tensor.
    pub fn is_contiguous(&self) -> bool {
        let expected = self.shape.contiguous_strides();
        self.shape.dims().iter().zip(self.strides.iter().zip(&expected)).all(|(&d, (s, e))| d <= 1 || s == e)
    }

    #[inline(always)]
    fn address(&self, n: usize, c: usize, w: usize) -> usize {
        let [sn, sc, sh, sw] = self.strides;
        let base = self.offset as isize + n as isize * sn + c as isize * sc;
        let (run, step) = self.run;
        let within = if run == self.shape.plane() {
            w as isize * step
        } else {
            (w / self.shape.w) as isize * sh + (w % self.shape.w) as isize * sw
        };
        (base + within) as usize
    }

    /// The values in C order, (n, c, position) (to stage them into device memory).
    #[cfg(feature = "cuda")]
    pub(crate) fn contiguous_values(&self) -> Result<Vec<T>> {
        let shape = self.shape;
        let mut values = Vec::new();
        values
            .try_reserve_exact(shape.numel())
            .map_err(|_| Error::allocation::<T>("a copy of the input", shape.numel()))?;
        let mut buf = vec![T::default(); if self.reads_in_place() { 0 } else { shape.plane() }];
        for n in 0..shape.n {
            for c in 0..shape.c {
                values.extend_from_slice(self.read(n, c, 0, shape.plane(), &mut buf));
            }
        }
        Ok(values)
    }

    /// The layout PyTorch gives this input's output and grad_input: channels-last when a 4D or
    /// 5D input is channels-last (NHWC, NDHWC) and not also C-contiguous, else C-contiguous
    /// (3D inputs included, as PyTorch's `suggest_memory_format`).
    pub fn output_layout(&self) -> Layout {
        if self.dims.as_slice().len() < 4 {
            return Layout::Contiguous;
        }
        let shape = self.shape;
        Layout::of(&[shape.n, shape.c, shape.h, shape.w], &self.strides).unwrap_or_default()
    }

    /// Whether [`Self::read`] borrows every plane in place (and so never uses its buffer).
    #[inline(always)]
    pub(crate) fn reads_in_place(&self) -> bool {
        self.half.is_none() && self.run == (self.shape.plane(), 1)
    }

    /// Values at offsets `w..w + len` of plane (n, c): borrowed when the plane is contiguous,
    /// else gathered into `buf` run by run. Any range of a plane can be read, so how kernels cut
    /// planes into blocks never depends on the layout.
    #[inline(always)]
    pub(crate) fn read<'s>(&'s self, n: usize, c: usize, w: usize, len: usize, buf: &'s mut [T]) -> &'s [T] {
        if let Some((bits, half)) = self.half {
            self.widen(bits, half, n, c, w, &mut buf[..len]);
            return &buf[..len];
        }
        if self.reads_in_place() {
            let start = self.address(n, c, w);
            return &self.data[start..start + len];
        }
        let (run, step) = self.run;
        let gathered = &mut buf[..len];
        let mut done = 0;
        while done < len {
            let at = w + done;
            let stretch = (run - at % run).min(len - done);
            let start = self.address(n, c, at) as isize;
            for (i, slot) in gathered[done..done + stretch].iter_mut().enumerate() {
                *slot = self.data[(start + i as isize * step) as usize];
            }
            done += stretch;
        }
        gathered
    }

    /// Half values at offsets `w..` of plane (n, c), widened into `out`: contiguous runs through
    /// the slice conversion (F16C where the CPU has it), other steps value by value. Only f32
    /// tensors hold half storage (see [`TensorRef::half`]), so `out` is always f32.
    #[inline(always)]
    fn widen(&self, bits: &[u16], half: Half, n: usize, c: usize, w: usize, out: &mut [T]) {
        let Some(out) = T::as_f32_mut(out) else { return };
        let (run, step) = self.run;
        let len = out.len();
        let mut done = 0;
        while done < len {
            let at = w + done;
            let stretch = (run - at % run).min(len - done);
            let start = self.address(n, c, at);
            let target = &mut out[done..done + stretch];
            if step == 1 {
                convert::widen_block(half, &bits[start..start + stretch], target);
            } else {
                for (i, slot) in target.iter_mut().enumerate() {
                    *slot = convert::widen_one(half, bits[(start as isize + i as isize * step) as usize]);
                }
            }
            done += stretch;
        }
    }
}

impl<'a> TensorRef<'a, f32> {
    /// A tensor of float16 or bfloat16 values (their bits) of `dims` with element `strides`, read as
    /// `ranks` says, that the kernels read as f32: each block is widened (exactly) as it is read,
    /// so the results are those of the f32 tensor of the same values, bit for bit.
    pub fn half(
        bits: &'a [u16],
        half: Half,
        offset: usize,
        dims: &[usize],
        strides: &[isize],
        ranks: Ranks,
    ) -> Result<Self> {
        let Some((shape, strides)) = Shape::view_of(dims, strides, ranks, "input")? else {
            return Err(Error::InvalidArgument(format!(
                "an input of shape {} whose spatial strides do not nest cannot be read in place: copy it \
                 C-contiguous first",
                shape_str(dims)
            )));
        };
        let view = Self::over(&[], bits.len(), offset, shape, strides)?;
        Ok(TensorRef { dims: Dims::new(dims, ranks), half: Some((bits, half)), ..view })
    }
}

/// How a dense (N, C, spatial...) result lies in memory: C-contiguous, or channels-last, where
/// element (n, c, s) of the flattened spatial position s is at (n·S + s)·C + c (NHWC, NDHWC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    #[default]
    Contiguous,
    ChannelsLast,
}

impl Layout {
    /// The layout of a dense array of `dims` (N, C, *) with element `strides`, if it has one of
    /// the two (dims of size 1 ignored; an array that is both is `Contiguous`).
    pub fn of(dims: &[usize], strides: &[isize]) -> Option<Layout> {
        let rank = dims.len().min(strides.len());
        // Whether the axes, fastest first, are laid out densely in that order.
        let dense = |order: &[usize]| {
            let mut expected = 1isize;
            order.iter().all(|&axis| {
                let ok = dims[axis] <= 1 || strides[axis] == expected;
                expected = expected.saturating_mul(dims[axis] as isize);
                ok
            })
        };
        let contiguous: Vec<usize> = (0..rank).rev().collect();
        if dense(&contiguous) {
            return Some(Layout::Contiguous);
        }
        // C fastest, then the spatial dims from the last, then N.
        let channels_last: Vec<usize> = [1].into_iter().chain((2..rank).rev()).chain([0]).collect();
        (rank >= 3 && dense(&channels_last)).then_some(Layout::ChannelsLast)
    }
}

/// Where a dense result goes: values of the element type, or half values (their bits) of a
/// float32 computation, each block narrowed (to nearest, ties to even) as it is written; laid out
/// C-contiguous (the default) or channels-last ([`TensorMut::with_layout`]).
pub struct TensorMut<'a, T> {
    target: Target<'a, T>,
    layout: Layout,
}

pub(crate) enum Target<'a, T> {
    Values(&'a mut [T]),
    Half(&'a mut [u16], Half),
}

impl<'a, T> TensorMut<'a, T> {
    pub fn values(values: &'a mut [T]) -> Self {
        TensorMut { target: Target::Values(values), layout: Layout::Contiguous }
    }
    /// Half output: `bits` of `half` values, for a float32 computation.
    pub fn half(bits: &'a mut [u16], half: Half) -> Self {
        TensorMut { target: Target::Half(bits, half), layout: Layout::Contiguous }
    }
    pub fn with_layout(self, layout: Layout) -> Self {
        TensorMut { layout, ..self }
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    pub fn is_half(&self) -> bool {
        matches!(self.target, Target::Half(..))
    }
    pub(crate) fn into_target(self) -> Target<'a, T> {
        self.target
    }
    pub fn len(&self) -> usize {
        match &self.target {
            Target::Values(values) => values.len(),
            Target::Half(bits, _) => bits.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(feature = "cuda")]
impl<T: Element> TensorMut<'_, T> {
    /// Writes `values` of `shape`, C-contiguous (as many as the target holds, checked by
    /// `check_target`): copied, or rounded once to the half type, in the target's layout.
    pub(crate) fn write_all(self, values: &[T], shape: Shape) -> Result<()> {
        let layout = self.layout;
        let per_image = shape.c * shape.plane();
        let at = |i: usize| match layout {
            Layout::Contiguous => i,
            Layout::ChannelsLast => {
                let (n, rest) = (i / per_image, i % per_image);
                shape.channels_last_index(n, rest / shape.plane(), rest % shape.plane())
            }
        };
        match self.target {
            Target::Values(to) => {
                for (i, &v) in values.iter().enumerate() {
                    to[at(i)] = v;
                }
            }
            Target::Half(bits, half) => {
                let values = T::as_f32(values).ok_or_else(|| Error::DType {
                    what: "output".into(),
                    expected: T::DTYPE.into(),
                    got: half.name().into(),
                })?;
                let mut narrowed = vec![0u16; values.len()];
                convert::narrow_block(half, values, &mut narrowed);
                for (i, b) in narrowed.into_iter().enumerate() {
                    bits[at(i)] = b;
                }
            }
        }
        Ok(())
    }
}

impl<'a, T> From<&'a mut [T]> for TensorMut<'a, T> {
    fn from(values: &'a mut [T]) -> Self {
        TensorMut::values(values)
    }
}

impl<'a, T> From<&'a mut Vec<T>> for TensorMut<'a, T> {
    fn from(values: &'a mut Vec<T>) -> Self {
        TensorMut::values(values)
    }
}

impl<'a, T, const N: usize> From<&'a mut [T; N]> for TensorMut<'a, T> {
    fn from(values: &'a mut [T; N]) -> Self {
        TensorMut::values(values)
    }
}
