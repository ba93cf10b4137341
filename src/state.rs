//! State dicts: the named tensors a layer saves and loads, with PyTorch's keys.

use crate::element::Element;
use crate::error::shape_str;

/// The values of one state-dict entry. Loading casts between the two kinds, as PyTorch's
/// `copy_` does. Floats are held in f64, which holds every f16, bf16, f32 and f64 value exactly,
/// so a float `num_batches_tracked` of 16777217 is not rounded through float32 on its way in.
#[derive(Clone, Debug, PartialEq)]
pub enum StateValues {
    Float(Vec<f64>),
    Int(Vec<i64>),
}

/// One state-dict entry: a shape and its values in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct StateTensor {
    pub shape: Vec<usize>,
    pub values: StateValues,
}

impl StateTensor {
    /// A (C,) float tensor holding `values`.
    pub fn float<T: Element>(values: &[T]) -> Self {
        StateTensor {
            shape: vec![values.len()],
            values: StateValues::Float(values.iter().map(|v| v.to_f64()).collect()),
        }
    }

    /// A 0-dimensional int64 tensor, like `num_batches_tracked`.
    pub fn scalar_int(value: i64) -> Self {
        StateTensor { shape: vec![], values: StateValues::Int(vec![value]) }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.values {
            StateValues::Float(v) => v.len(),
            StateValues::Int(v) => v.len(),
        }
    }

    /// The values cast to `T`, written into `target` (of the same length).
    pub(crate) fn cast_into<T: Element>(&self, target: &mut [T]) {
        match &self.values {
            StateValues::Float(v) => target.iter_mut().zip(v).for_each(|(t, &x)| *t = T::from_f64(x)),
            StateValues::Int(v) => target.iter_mut().zip(v).for_each(|(t, &i)| *t = T::from_f64(i as f64)),
        }
    }

    /// The first value as an integer, truncated toward zero as PyTorch's `copy_` into int64 does
    /// (saturating at the int64 range; NaN gives 0).
    pub(crate) fn first_int(&self) -> Option<i64> {
        match &self.values {
            StateValues::Float(v) => v.first().map(|&x| x as i64),
            StateValues::Int(v) => v.first().copied(),
        }
    }
}

/// What `load_state_dict` did not match, as PyTorch's `_IncompatibleKeys`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub missing_keys: Vec<String>,
    pub unexpected_keys: Vec<String>,
}

pub(crate) fn size_mismatch(key: &str, got: &[usize], expected: &[usize]) -> String {
    format!(
        "size mismatch for {key}: copying a param with shape {} from checkpoint, the shape in current model is {}",
        shape_str(got),
        shape_str(expected)
    )
}

pub(crate) fn quoted_list(keys: &[String]) -> String {
    keys.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ")
}
