//! Operations that pick entries: fixed-index selections (slices with steps,
//! gathers, splits), embedding lookups by token ids, and `Where` with a mask
//! fixed at load time, and broadcasts. All are linear in their differentiable
//! operands.

use super::super::rule::{Backward, Cotangents, Forward, Rule};
use super::super::{resolve_shape, Dim, NodeId};
use crate::Value;
use hvp_tensor::{nd, Float};

/// The entries at `indices` along `axis` (a slice `start:end:step`, a split
/// part, or a gather with indices known at load time).
#[derive(Clone, Debug, PartialEq)]
pub struct Select {
    pub input: NodeId,
    pub axis: usize,
    pub indices: Vec<usize>,
}

impl Rule for Select {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        cx.value(self.input)
            .linear(|t| nd::index_select(t, self.axis, &self.indices))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let len = cx.value(self.input).primal().shape()[self.axis];
        out.input(
            self.input,
            gy.linear(|g| nd::index_add(g, self.axis, &self.indices, len)),
        );
    }
}

/// Rows of `table` `[V, ...]` picked by the integer ids that `ids` holds (as
/// floats, checked to be ids in `0..V` when the data is read): `nn.Embedding`.
/// Differentiable in the table only.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    pub table: NodeId,
    pub ids: NodeId,
}

impl Embedding {
    fn rows<T: Float>(ids: &hvp_tensor::Tensor<T>, vocab: usize) -> Vec<usize> {
        ids.data()
            .iter()
            .map(|&v| {
                let id = v.to_f64();
                assert!(
                    id >= 0.0 && id < vocab as f64 && id.fract() == 0.0,
                    "token id {id} outside 0..{vocab} reached an embedding (ids are checked when data is read)"
                );
                id as usize
            })
            .collect()
    }
}

impl Rule for Embedding {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.table, self.ids]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.table, &mut self.ids]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        let ids = cx.value(self.ids).primal();
        let table = cx.value(self.table);
        let vocab = table.primal().shape()[0];
        let rows = Self::rows(ids, vocab);
        let mut shape = ids.shape().to_vec();
        shape.extend_from_slice(&table.primal().shape()[1..]);
        table.linear(|t| {
            nd::index_select(t, 0, &rows)
                .reshape(&shape)
                .expect("rows times row size")
        })
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let ids = cx.value(self.ids).primal();
        let table_shape = cx.value(self.table).primal().shape().to_vec();
        let rows = Self::rows(ids, table_shape[0]);
        let mut flat = vec![rows.len()];
        flat.extend_from_slice(&table_shape[1..]);
        out.input(
            self.table,
            gy.linear(|g| {
                let g = g.clone().reshape(&flat).expect("rows times row size");
                nd::index_add(&g, 0, &rows, table_shape[0])
            }),
        );
    }
}

/// `mask ? a : b` with the mask (0/1 in buffer `mask`) fixed at load time; all
/// three broadcast to the output. Each side is zeroed exactly where the other
/// is picked, so an infinite fill value stays where it belongs.
#[derive(Clone, Debug, PartialEq)]
pub struct Where {
    pub a: NodeId,
    pub b: NodeId,
    pub mask: usize,
}

impl Rule for Where {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.a, self.b]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.a, &mut self.b]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        let (a, b, mask) = (cx.value(self.a), cx.value(self.b), cx.buffer(self.mask));
        let shape = nd::broadcast_shape(a.primal().shape(), b.primal().shape())
            .and_then(|s| nd::broadcast_shape(&s, mask.shape()))
            .expect("shapes checked at import");
        let picked = a.linear(|t| nd::masked(t, mask, true, &shape));
        picked.add(&b.linear(|t| nd::masked(t, mask, false, &shape)))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let mask = cx.buffer(self.mask);
        let shape = gy.primal().shape().to_vec();
        for (node, keep) in [(self.a, true), (self.b, false)] {
            if cx.needs(node) {
                let own = cx.value(node).primal().shape().to_vec();
                out.input(
                    node,
                    gy.linear(|g| nd::reduce_to(&nd::masked(g, mask, keep, &shape), &own)),
                );
            }
        }
    }
}

/// `input` broadcast to `shape` (numpy rules; `shape` may name the batch size):
/// a class token repeated over the batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Expand {
    pub input: NodeId,
    pub shape: Vec<Dim>,
}

impl Rule for Expand {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        let shape = resolve_shape(&self.shape, cx.batch());
        cx.value(self.input).linear(|t| nd::expand(t, &shape))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let own = cx.value(self.input).primal().shape().to_vec();
        out.input(self.input, gy.linear(|g| nd::reduce_to(g, &own)));
    }
}
