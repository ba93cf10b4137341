//! State dicts: the named tensors a layer saves and loads, with PyTorch's keys.

use crate::element::Element;
use crate::error::shape_str;

/// The values of one state-dict entry. Loading casts between the two kinds, as PyTorch's
/// `copy_` does.
#[derive(Clone, Debug, PartialEq)]
pub enum StateValues<T> {
    Float(Vec<T>),
    Int(Vec<i64>),
}

/// One state-dict entry: a shape and its values in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct StateTensor<T> {
    pub shape: Vec<usize>,
    pub values: StateValues<T>,
}

impl<T: Element> StateTensor<T> {
    pub fn float(values: Vec<T>) -> Self {
        StateTensor { shape: vec![values.len()], values: StateValues::Float(values) }
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

    pub(crate) fn to_floats(&self) -> Vec<T> {
        match &self.values {
            StateValues::Float(v) => v.clone(),
            StateValues::Int(v) => v.iter().map(|&i| T::from_f64(i as f64)).collect(),
        }
    }

    pub(crate) fn first_int(&self) -> Option<i64> {
        match &self.values {
            StateValues::Float(v) => v.first().map(|x| x.to_f64() as i64),
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
