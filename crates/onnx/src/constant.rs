//! Tensors known at load time: initializers, `Constant` nodes and the shape
//! arithmetic exporters emit (`Shape → Gather → Concat → Reshape`), folded once.
//! The batch size is the one value not known at load time; it is carried as
//! the symbol [`Scalar::Batch`] and may only be moved around, not computed with.

use crate::proto::{data_type, TensorProto};
use hvp_tensor::nd;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    Float(f64),
    Int(i64),
    /// The batch size, whatever it will be.
    Batch,
    /// The batch size times a number (k ≥ 2): `bsz * num_heads`.
    BatchTimes(usize),
}

impl Scalar {
    pub fn as_f64(self) -> Option<f64> {
        match self {
            Scalar::Float(v) => Some(v),
            Scalar::Int(v) => Some(v as f64),
            Scalar::Batch | Scalar::BatchTimes(_) => None,
        }
    }
}

/// A load-time tensor; `float` says whether it is floating point (data) or
/// integer (shapes, indices, axes).
#[derive(Clone, Debug)]
pub struct Constant {
    pub shape: Vec<usize>,
    pub values: Vec<Scalar>,
    pub float: bool,
}

fn chunks<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    raw.chunks_exact(N).map(|c| c.try_into().expect("exact chunk"))
}

impl Constant {
    pub fn floats(shape: Vec<usize>, values: impl IntoIterator<Item = f64>) -> Self {
        Constant {
            shape,
            values: values.into_iter().map(Scalar::Float).collect(),
            float: true,
        }
    }

    pub fn ints(shape: Vec<usize>, values: impl IntoIterator<Item = Scalar>) -> Self {
        Constant {
            shape,
            values: values.into_iter().collect(),
            float: false,
        }
    }

    pub fn numel(&self) -> usize {
        self.values.len()
    }

    /// Decodes an ONNX tensor (inline or in an external data file next to the model).
    pub fn from_proto(t: &TensorProto, model_dir: &Path) -> Result<Self, String> {
        let shape = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("tensor '{}' has a negative dimension {d}", t.name)))
            .collect::<Result<Vec<_>, _>>()?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor '{}' has shape {shape:?}, whose size overflows", t.name))?;
        let elem = match t.data_type {
            data_type::DOUBLE | data_type::INT64 => 8,
            data_type::FLOAT | data_type::INT32 => 4,
            _ => 1,
        };
        let external;
        let raw: &[u8] = if t.data_location == 1 {
            let expected = numel
                .checked_mul(elem)
                .ok_or_else(|| format!("tensor '{}' has shape {shape:?}, whose size overflows", t.name))?;
            external = read_external(t, model_dir, expected)?;
            &external
        } else {
            &t.raw_data
        };
        let (values, float): (Vec<Scalar>, bool) = match t.data_type {
            data_type::FLOAT if !raw.is_empty() => (
                chunks::<4>(raw)
                    .map(|b| f32::from_le_bytes(b) as f64)
                    .map(Scalar::Float)
                    .collect(),
                true,
            ),
            data_type::FLOAT => (t.float_data.iter().map(|&v| Scalar::Float(v as f64)).collect(), true),
            data_type::DOUBLE if !raw.is_empty() => (
                chunks::<8>(raw).map(f64::from_le_bytes).map(Scalar::Float).collect(),
                true,
            ),
            data_type::DOUBLE => (t.double_data.iter().map(|&v| Scalar::Float(v)).collect(), true),
            data_type::INT64 if !raw.is_empty() => (
                chunks::<8>(raw).map(i64::from_le_bytes).map(Scalar::Int).collect(),
                false,
            ),
            data_type::INT64 => (t.int64_data.iter().map(|&v| Scalar::Int(v)).collect(), false),
            data_type::INT32 if !raw.is_empty() => (
                chunks::<4>(raw)
                    .map(|b| Scalar::Int(i32::from_le_bytes(b) as i64))
                    .collect(),
                false,
            ),
            data_type::INT32 | data_type::INT8 | data_type::UINT8 | data_type::BOOL if raw.is_empty() => {
                (t.int32_data.iter().map(|&v| Scalar::Int(v as i64)).collect(), false)
            }
            data_type::INT8 => (raw.iter().map(|&b| Scalar::Int(b as i8 as i64)).collect(), false),
            data_type::UINT8 | data_type::BOOL => (raw.iter().map(|&b| Scalar::Int(b as i64)).collect(), false),
            other => {
                return Err(format!(
                "tensor '{}' has ONNX data type {other}; hvp reads float, double, int64, int32, int8, uint8 and bool",
                t.name
            ))
            }
        };
        if values.len() != numel {
            return Err(format!(
                "tensor '{}' of shape {shape:?} holds {} values instead of {numel} (truncated file?)",
                t.name,
                values.len()
            ));
        }
        // Infinities are legitimate in constants (a `-inf` attention mask);
        // parameters are checked for them where they become parameters.
        if float && values.iter().any(|v| v.as_f64().is_some_and(f64::is_nan)) {
            return Err(format!("tensor '{}' contains NaN values", t.name));
        }
        Ok(Constant { shape, values, float })
    }

    /// The values as f64, when none is the symbolic batch size.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        self.values.iter().map(|v| v.as_f64()).collect()
    }

    /// Integer values (axes, indices), when all are known.
    pub fn known_ints(&self) -> Option<Vec<i64>> {
        self.values
            .iter()
            .map(|v| match *v {
                Scalar::Int(i) => Some(i),
                Scalar::Float(f) if f.fract() == 0.0 => Some(f as i64),
                _ => None,
            })
            .collect()
    }

    pub fn reshape(&self, shape: Vec<usize>) -> Self {
        Constant {
            shape,
            values: self.values.clone(),
            float: self.float,
        }
    }

    /// Elements at `indices` (flat positions into `self.values`), with `shape`.
    fn pick(&self, shape: Vec<usize>, indices: impl IntoIterator<Item = usize>) -> Self {
        Constant {
            shape,
            values: indices.into_iter().map(|i| self.values[i]).collect(),
            float: self.float,
        }
    }

    /// `Gather(self, indices, axis)`.
    pub fn gather(&self, indices: &[i64], index_shape: &[usize], axis: usize) -> Result<Self, String> {
        let n = self.shape[axis];
        let outer: usize = self.shape[..axis].iter().product();
        let inner: usize = self.shape[axis + 1..].iter().product();
        let mut resolved = Vec::with_capacity(indices.len());
        for &i in indices {
            let j = if i < 0 { i + n as i64 } else { i };
            if j < 0 || j >= n as i64 {
                return Err(format!("index {i} is out of range for a dimension of size {n}"));
            }
            resolved.push(j as usize);
        }
        let mut shape = self.shape[..axis].to_vec();
        shape.extend_from_slice(index_shape);
        shape.extend_from_slice(&self.shape[axis + 1..]);
        check_size(&shape)?;
        let mut picks = Vec::with_capacity(outer * resolved.len() * inner);
        for o in 0..outer {
            for &j in &resolved {
                picks.extend((0..inner).map(|k| (o * n + j) * inner + k));
            }
        }
        Ok(self.pick(shape, picks))
    }

    /// `Concat(parts, axis)` (equal shapes except along `axis`, checked by the caller).
    pub fn concat(parts: &[&Constant], axis: usize) -> Self {
        let mut shape = parts[0].shape.clone();
        shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
        let outer: usize = shape[..axis].iter().product();
        let mut values = Vec::new();
        for o in 0..outer {
            for p in parts {
                let len: usize = p.shape[axis..].iter().product();
                values.extend_from_slice(&p.values[o * len..(o + 1) * len]);
            }
        }
        Constant {
            shape,
            values,
            float: parts.iter().any(|p| p.float),
        }
    }

    /// Broadcast to `shape` (numpy rules, checked by the caller).
    pub fn expand(&self, shape: &[usize]) -> Result<Self, String> {
        check_size(shape)?;
        let positions: Vec<f64> = (0..self.numel()).map(|i| i as f64).collect();
        let src = hvp_tensor::Tensor::new(self.shape.clone(), positions).expect("own length");
        let grown = nd::expand(&src, shape);
        Ok(self.pick(shape.to_vec(), grown.data().iter().map(|&p| p as usize)))
    }

    pub fn transpose(&self, perm: &[usize]) -> Self {
        let positions: Vec<f64> = (0..self.numel()).map(|i| i as f64).collect();
        let src = hvp_tensor::Tensor::new(self.shape.clone(), positions).expect("own length");
        let moved = nd::permute(&src, perm);
        self.pick(moved.shape().to_vec(), moved.data().iter().map(|&p| p as usize))
    }

    /// Converts to floating point (`to_float`) or integers.
    pub fn cast(&self, to_float: bool) -> Result<Self, String> {
        let values = self
            .values
            .iter()
            .map(|&v| match (v, to_float) {
                (Scalar::Batch | Scalar::BatchTimes(_), true) => Err("the batch size cannot become data".to_string()),
                (v @ (Scalar::Batch | Scalar::BatchTimes(_)), false) => Ok(v),
                (Scalar::Float(f), false) => Ok(Scalar::Int(f as i64)),
                (Scalar::Int(i), true) => Ok(Scalar::Float(i as f64)),
                (v, _) => Ok(v),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Constant {
            shape: self.shape.clone(),
            values,
            float: to_float,
        })
    }

    /// Elementwise `a ∘ b` with broadcasting; the batch size cannot take part.
    pub fn arith(a: &Constant, b: &Constant, op: char) -> Result<Self, String> {
        let shape = nd::broadcast_shape(&a.shape, &b.shape)
            .ok_or_else(|| format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape))?;
        let (ea, eb) = (a.expand(&shape)?, b.expand(&shape)?);
        let float = a.float || b.float;
        let mut values = Vec::with_capacity(ea.numel());
        for (&x, &y) in ea.values.iter().zip(&eb.values) {
            if let Some(v) = batch_arith(x, y, op) {
                values.push(v);
                continue;
            }
            let v = match (x, y) {
                (Scalar::Int(x), Scalar::Int(y)) if !float => Scalar::Int(
                    match op {
                        '+' => x.checked_add(y),
                        '-' => x.checked_sub(y),
                        '*' => x.checked_mul(y),
                        _ if y == 0 => return Err("integer division by zero".into()),
                        _ => x.checked_div_euclid(y),
                    }
                    .ok_or_else(|| format!("integer overflow in {x} {op} {y}"))?,
                ),
                (x, y) => match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => Scalar::Float(match op {
                        '+' => x + y,
                        '-' => x - y,
                        '*' => x * y,
                        _ => x / y,
                    }),
                    _ => return Err("arithmetic on the batch size (the graph computes with a dynamic shape)".into()),
                },
            };
            values.push(v);
        }
        Ok(Constant { shape, values, float })
    }
}

impl Constant {
    /// `Equal(a, b)` as 0/1 integers. The batch size is at least 1, so it
    /// equals no number below 1 (the `-1` of a reshape target); comparing it
    /// with a positive number depends on the batch and is refused.
    pub fn equal(a: &Constant, b: &Constant) -> Result<Self, String> {
        Self::zip(a, b, false, |x, y| {
            let same = match (x, y) {
                (Scalar::Batch, Scalar::Batch) => true,
                (Scalar::BatchTimes(p), Scalar::BatchTimes(q)) => p == q,
                (Scalar::Batch | Scalar::BatchTimes(_), v) | (v, Scalar::Batch | Scalar::BatchTimes(_)) => {
                    match v.as_f64() {
                        Some(n) if n < 1.0 => false,
                        _ => return Err("comparing the batch size with a number (a dynamic shape)".into()),
                    }
                }
                (x, y) => x.as_f64() == y.as_f64(),
            };
            Ok(Scalar::Int(same as i64))
        })
    }

    /// `Mod(a, b)`: the sign of the divisor (`fmod` = false, integers) or of
    /// the dividend (`fmod` = true, C's fmod).
    pub fn modulo(a: &Constant, b: &Constant, fmod: bool) -> Result<Self, String> {
        let float = a.float || b.float;
        Self::zip(a, b, float, |x, y| match (x, y) {
            (Scalar::Int(x), Scalar::Int(y)) if !float => {
                if y == 0 {
                    return Err("integer modulo by zero".into());
                }
                Ok(Scalar::Int(if fmod { x % y } else { ((x % y) + y) % y }))
            }
            (x, y) => match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => Ok(Scalar::Float(if fmod { x % y } else { x - y * (x / y).floor() })),
                _ => Err("modulo of the batch size (a dynamic shape)".into()),
            },
        })
    }

    /// `Where(cond, a, b)` with broadcasting.
    pub fn select_where(cond: &Constant, a: &Constant, b: &Constant) -> Result<Self, String> {
        let shape = nd::broadcast_shape(&a.shape, &b.shape)
            .and_then(|s| nd::broadcast_shape(&s, &cond.shape))
            .ok_or_else(|| {
                format!(
                    "shapes {:?}, {:?} and {:?} do not broadcast",
                    cond.shape, a.shape, b.shape
                )
            })?;
        let (c, a2, b2) = (cond.expand(&shape)?, a.expand(&shape)?, b.expand(&shape)?);
        let values = c
            .values
            .iter()
            .zip(a2.values.iter().zip(&b2.values))
            .map(|(k, (&x, &y))| match k.as_f64() {
                Some(v) => Ok(if v != 0.0 { x } else { y }),
                None => Err("a condition holding the batch size".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Constant {
            shape,
            values,
            float: a.float || b.float,
        })
    }

    /// `Trilu`: the upper (`upper`) or lower triangle of the last two
    /// dimensions from diagonal `k` on, the rest zero.
    pub fn trilu(&self, k: i64, upper: bool) -> Result<Self, String> {
        let [.., rows, cols] = self.shape[..] else {
            return Err(format!("Trilu needs at least 2 dimensions, got {:?}", self.shape));
        };
        let zero = if self.float { Scalar::Float(0.0) } else { Scalar::Int(0) };
        let values = self
            .values
            .iter()
            .enumerate()
            .map(|(at, &v)| {
                let (r, c) = (((at / cols) % rows) as i64, (at % cols) as i64);
                let keep = if upper { c - r >= k } else { c - r <= k };
                if keep {
                    v
                } else {
                    zero
                }
            })
            .collect();
        Ok(Constant {
            shape: self.shape.clone(),
            values,
            float: self.float,
        })
    }

    /// `Range(start, limit, delta)`: `ceil((limit − start) / delta)` values.
    pub fn range(start: Scalar, limit: Scalar, delta: Scalar, float: bool) -> Result<Self, String> {
        let (Some(s), Some(l), Some(d)) = (start.as_f64(), limit.as_f64(), delta.as_f64()) else {
            return Err("a range up to the batch size (a dynamic shape)".into());
        };
        if d == 0.0 {
            return Err("Range with a zero step".into());
        }
        let n = ((l - s) / d).ceil().max(0.0) as usize;
        check_size(&[n])?;
        let values = (0..n).map(|i| {
            let v = s + i as f64 * d;
            if float {
                Scalar::Float(v)
            } else {
                Scalar::Int(v as i64)
            }
        });
        Ok(Constant {
            shape: vec![n],
            values: values.collect(),
            float,
        })
    }

    fn zip(
        a: &Constant,
        b: &Constant,
        float: bool,
        f: impl Fn(Scalar, Scalar) -> Result<Scalar, String>,
    ) -> Result<Self, String> {
        let shape = nd::broadcast_shape(&a.shape, &b.shape)
            .ok_or_else(|| format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape))?;
        let (ea, eb) = (a.expand(&shape)?, b.expand(&shape)?);
        let values = ea
            .values
            .iter()
            .zip(&eb.values)
            .map(|(&x, &y)| f(x, y))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Constant { shape, values, float })
    }
}

/// The batch size times a number: what `bsz * num_heads` (either order)
/// and its division by a factor of it give; `None` for anything else.
fn batch_arith(x: Scalar, y: Scalar, op: char) -> Option<Scalar> {
    let factor = |s: Scalar| match s {
        Scalar::Batch => Some(1),
        Scalar::BatchTimes(k) => Some(k),
        _ => None,
    };
    let times = |k: usize| if k == 1 { Scalar::Batch } else { Scalar::BatchTimes(k) };
    match (factor(x), factor(y), x, y, op) {
        (Some(k), None, _, Scalar::Int(n), '*') | (None, Some(k), Scalar::Int(n), _, '*') if n >= 1 => {
            Some(times(k * n as usize))
        }
        (Some(k), None, _, Scalar::Int(n), '/') if n >= 1 && k.is_multiple_of(n as usize) => {
            Some(times(k / n as usize))
        }
        _ => None,
    }
}

/// Most elements of a tensor computed at load time (shape plumbing, folded
/// constants): far above any real model's, far below what would exhaust memory.
pub const MAX_CONSTANT_ELEMENTS: usize = 1 << 26;

/// Refuses a load-time tensor whose size overflows or exceeds [`MAX_CONSTANT_ELEMENTS`].
pub fn check_size(shape: &[usize]) -> Result<usize, String> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= MAX_CONSTANT_ELEMENTS => Ok(n),
        _ => Err(format!(
            "a load-time tensor of shape {shape:?} would exceed {MAX_CONSTANT_ELEMENTS} elements"
        )),
    }
}

/// Reads the bytes of a tensor stored outside the model (`location`, `offset`,
/// `length` entries). The file must lie inside the model's folder (no `..`, no
/// absolute path, no symlink out) and be a regular file holding the whole range;
/// only `expected` bytes (the declared shape × element size) are read.
fn read_external(t: &TensorProto, model_dir: &Path, expected: usize) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let entry = |key: &str| t.external_data.iter().find(|e| e.key == key).map(|e| e.value.as_str());
    let location = entry("location").ok_or_else(|| format!("tensor '{}' is external but names no file", t.name))?;
    let file = hvp_io::confine::resolve_inside(model_dir, location, &model_dir.join("<model>"))
        .map_err(|e| format!("tensor '{}': {e}", t.name))?;
    let (handle, size) = hvp_io::read::open_regular(&file).map_err(|e| format!("tensor '{}': {e}", t.name))?;
    let parse = |key: &str| -> Result<Option<u64>, String> {
        entry(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("tensor '{}': bad external {key} '{v}'", t.name))
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?.unwrap_or(expected as u64);
    if length != expected as u64 {
        return Err(format!(
            "tensor '{}': external length {length} bytes, but its shape and type need {expected}",
            t.name
        ));
    }
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "tensor '{}': {} has {size} bytes, shorter than offset {offset} + length {length}",
            t.name,
            file.display()
        ));
    }
    let mut bytes = vec![0u8; expected];
    handle
        .read_exact_at(&mut bytes, offset)
        .map_err(|e| format!("tensor '{}': cannot read {}: {e}", t.name, file.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_plumbing_keeps_the_batch_symbol() {
        let shape = Constant::ints(
            vec![4],
            [Scalar::Batch, Scalar::Int(64), Scalar::Int(1), Scalar::Int(1)],
        );
        let first = shape.gather(&[0], &[1], 0).unwrap();
        assert_eq!(first.values, vec![Scalar::Batch]);
        let target = Constant::concat(&[&first, &Constant::ints(vec![1], [Scalar::Int(-1)])], 0);
        assert_eq!(target.values, vec![Scalar::Batch, Scalar::Int(-1)]);
        assert!(Constant::arith(&first, &first, '*').is_err());
        assert!(shape.gather(&[7], &[1], 0).is_err());
    }

    #[test]
    fn decodes_raw_and_typed_fields() {
        let t = TensorProto {
            dims: vec![2],
            data_type: data_type::FLOAT,
            raw_data: [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat(),
            ..Default::default()
        };
        let c = Constant::from_proto(&t, Path::new(".")).unwrap();
        assert_eq!(c.to_f64().unwrap(), vec![1.5, -2.0]);
        let short = TensorProto {
            dims: vec![3],
            ..t.clone()
        };
        assert!(Constant::from_proto(&short, Path::new("."))
            .unwrap_err()
            .contains("truncated"));
        let ints = TensorProto {
            dims: vec![2],
            data_type: data_type::INT64,
            int64_data: vec![3, -1],
            ..Default::default()
        };
        assert_eq!(
            Constant::from_proto(&ints, Path::new("."))
                .unwrap()
                .known_ints()
                .unwrap(),
            vec![3, -1]
        );
    }

    #[test]
    fn trilu_keeps_a_triangle_from_diagonal_k() {
        let ones = Constant::ints(vec![3, 3], vec![Scalar::Int(1); 9]);
        let upper = ones.trilu(1, true).unwrap();
        assert_eq!(upper.known_ints().unwrap(), vec![0, 1, 1, 0, 0, 1, 0, 0, 0]);
        let lower = ones.trilu(0, false).unwrap();
        assert_eq!(lower.known_ints().unwrap(), vec![1, 0, 0, 1, 1, 0, 1, 1, 1]);
    }

    #[test]
    fn expand_transpose_and_arith_fold() {
        let a = Constant::floats(vec![2, 1], [1.0, 2.0]);
        let e = a.expand(&[2, 3]).unwrap();
        assert_eq!(e.to_f64().unwrap(), vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        let t = Constant::floats(vec![2, 3], (0..6).map(f64::from)).transpose(&[1, 0]);
        assert_eq!(t.to_f64().unwrap(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let s = Constant::arith(&a, &Constant::floats(vec![], [10.0]), '*').unwrap();
        assert_eq!(s.to_f64().unwrap(), vec![10.0, 20.0]);
    }
}
