//! 2-D convolution (cross-correlation, as PyTorch's `Conv2d`) over NCHW tensors
//! by im2col + GEMM, with its two backward forms: with respect to the input
//! (GEMM + col2im) and with respect to the weights (GEMM against the im2col
//! patches). One image per rayon task, GEMMs single-threaded inside.
//! `lowering` holds im2col/col2im, `rows` the row-patch path of same-size
//! stride-1 layers.

use crate::linalg::{gemm_into, gemm_strided_overwrite, Par, RowStrides};
use crate::pool::out_size;
use crate::{Float, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

mod gram;
mod grouped;
mod lowering;
mod rows;

pub use grouped::{backward_input_dual_grouped, backward_weight_grouped, forward_dual_grouped, Grouping};

pub use gram::{patch_gram_3x3, patch_gram_3x3_of, patch_sums_3x3_of};
use lowering::*;

/// Images per partial weight gradient. Fixed (not tied to the thread count) so
/// the summation order, and hence the result, is the same for any `--threads`.
const WEIGHT_GRAD_GROUP: usize = 8;

/// Below this many output channels the forward pass stacks `[W; Ẇ]` into one GEMM.
const STACK_BELOW_CHANNELS: usize = 32;

/// `src` into `dst` (compiles to a memcpy).
fn copy_uninit<T: Float>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    for (o, &v) in dst.iter_mut().zip(src) {
        o.write(v);
    }
}

/// `c = a [m × k] · b [k × n]` (contiguous) into an image's uninitialised
/// output slot of exactly `m × n`, which it returns initialised.
fn gemm_overwrite<'c, T: Float>(
    c: &'c mut [MaybeUninit<T>],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
) -> &'c mut [T] {
    let ld = RowStrides::packed(false, false, m, n, k);
    gemm_strided_overwrite(c, a, false, b, false, m, n, k, ld, Par::Serial).expect("an image's whole output")
}

/// `dst [cols × rows] = srcᵀ` for a row-major `src [rows × cols]`, by 8×8
/// blocks: f32 blocks by AVX shuffles where the CPU has AVX (eight vector loads
/// and stores per block), others element by element.
fn transpose_into<T: Float>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    assert!(
        src.len() >= rows * cols && dst.len() >= rows * cols,
        "transpose of {rows}×{cols}"
    );
    const B: usize = 8;
    #[cfg(target_arch = "x86_64")]
    let simd = simd_transpose::for_type::<T>();
    for r0 in (0..rows).step_by(B) {
        let rn = B.min(rows - r0);
        for c0 in (0..cols).step_by(B) {
            let cn = B.min(cols - c0);
            #[cfg(target_arch = "x86_64")]
            if rn == B && cn == B {
                if let Some(block) = simd {
                    block(&src[r0 * cols + c0..], cols, &mut dst[c0 * rows + r0..], rows);
                    continue;
                }
            }
            for r in r0..r0 + rn {
                for c in c0..c0 + cn {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// The 8×8 f32 block transpose of [`transpose_into`] on AVX.
#[cfg(target_arch = "x86_64")]
mod simd_transpose {
    use crate::Float;
    use std::any::TypeId;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    /// `block(src, src_ld, dst, dst_ld)`: `dst[c·dst_ld + r] = src[r·src_ld + c]`
    /// for `r, c < 8`.
    pub(super) type Block<T> = fn(&[T], usize, &mut [T], usize);

    /// The AVX block for f32 on a CPU with AVX; `None` otherwise.
    pub(super) fn for_type<T: Float>() -> Option<Block<T>> {
        static AVX: OnceLock<bool> = OnceLock::new();
        let avx = *AVX.get_or_init(|| is_x86_feature_detected!("avx"));
        if !avx || TypeId::of::<T>() != TypeId::of::<f32>() {
            return None;
        }
        // SAFETY: T is f32 (checked above), so the two fn types are the same type.
        Some(unsafe { std::mem::transmute::<Block<f32>, Block<T>>(block_f32) })
    }

    fn block_f32(src: &[f32], src_ld: usize, dst: &mut [f32], dst_ld: usize) {
        assert!(
            src_ld >= 8 && dst_ld >= 8 && src.len() >= 7 * src_ld + 8 && dst.len() >= 7 * dst_ld + 8,
            "8×8 transpose block out of bounds"
        );
        // SAFETY: AVX was detected before this function was handed out, and the
        // assertion above keeps the eight rows read and written in bounds.
        unsafe { block_f32_avx(src.as_ptr(), src_ld, dst.as_mut_ptr(), dst_ld) }
    }

    /// # Safety
    /// The CPU has AVX; `src` holds 8 rows of 8 at stride `src_ld`, `dst` 8 rows of
    /// 8 at stride `dst_ld`.
    #[target_feature(enable = "avx")]
    unsafe fn block_f32_avx(src: *const f32, src_ld: usize, dst: *mut f32, dst_ld: usize) {
        // SAFETY: in bounds by the caller's contract.
        let row = |r: usize| unsafe { _mm256_loadu_ps(src.add(r * src_ld)) };
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        let (r4, r5, r6, r7) = (row(4), row(5), row(6), row(7));
        // Pairs of rows interleaved, then quads, then the 128-bit halves swapped.
        let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
        let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
        let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
        let q0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let q1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let q2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let q3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let q4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let q5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let q6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let q7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let columns = [
            _mm256_permute2f128_ps::<0x20>(q0, q4),
            _mm256_permute2f128_ps::<0x20>(q1, q5),
            _mm256_permute2f128_ps::<0x20>(q2, q6),
            _mm256_permute2f128_ps::<0x20>(q3, q7),
            _mm256_permute2f128_ps::<0x31>(q0, q4),
            _mm256_permute2f128_ps::<0x31>(q1, q5),
            _mm256_permute2f128_ps::<0x31>(q2, q6),
            _mm256_permute2f128_ps::<0x31>(q3, q7),
        ];
        for (c, v) in columns.into_iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { _mm256_storeu_ps(dst.add(c * dst_ld), v) };
        }
    }
}

/// An initialised slice seen as one that may be written without reading.
fn as_uninit<T>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: same layout; callers only write initialised `T`s through it, so
    // the slice stays initialised.
    unsafe { &mut *(s as *mut [T] as *mut [MaybeUninit<T>]) }
}

/// # Safety
/// Every element of `s` must be initialised.
unsafe fn assume_init_mut<T>(s: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: same layout; the caller guarantees initialisation.
    unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Stride and zero padding of a convolution (equal along both axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: usize,
    pub padding: usize,
}

struct Dims {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
}

impl Dims {
    fn new(input: &[usize], weight: &[usize], g: ConvGeometry) -> Self {
        assert_eq!(input.len(), 4, "conv input must be NCHW, got {input:?}");
        assert_eq!(weight.len(), 4, "conv weight must be OIHW, got {weight:?}");
        assert_eq!(
            input[1], weight[1],
            "conv: input has {} channels, weight expects {}",
            input[1], weight[1]
        );
        let (h, w, kh, kw) = (input[2], input[3], weight[2], weight[3]);
        Dims {
            c: input[1],
            h,
            w,
            o: weight[0],
            kh,
            kw,
            ho: out_size(h, kh, g.stride, g.padding),
            wo: out_size(w, kw, g.stride, g.padding),
        }
    }
    fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn out_plane(&self) -> usize {
        self.ho * self.wo
    }
}

/// The im2col patches of one image `x` `[C, H, W]` for weights of shape `w_shape`:
/// a row-major `[C·kh·kw, Ho·Wo]` matrix (what K-FAC's input factor is built from).
pub fn patches<T: Float>(x: &[T], image_shape: &[usize], w_shape: &[usize], g: ConvGeometry) -> Vec<T> {
    let d = Dims::new(&[1, image_shape[0], image_shape[1], image_shape[2]], w_shape, g);
    let mut cols = vec![T::ZERO; d.patch() * d.out_plane()];
    im2col(x, &d, g, &mut cols);
    cols
}

/// `y = conv2d(x, w)`: x `[B, C, H, W]`, w `[O, C, kh, kw]` → `[B, O, Ho, Wo]`.
pub fn forward<T: Float>(x: &Tensor<T>, w: &Tensor<T>, g: ConvGeometry) -> Tensor<T> {
    forward_dual(x, None, w, None, g).0
}

/// The convolution and its tangent, `(conv(x, w), conv(ẋ, w) + conv(x, ẇ))`,
/// computing each image's im2col patches once for all products.
pub fn forward_dual<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    w: &Tensor<T>,
    dw: Option<&Tensor<T>>,
    g: ConvGeometry,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let d = Dims::new(x.shape(), w.shape(), g);
    if rows::applies(&d, g) {
        return rows::forward_dual(x, dx, w, dw, &d, d.o < STACK_BELOW_CHANNELS);
    }
    let b = x.shape()[0];
    let (patch, plane) = (d.patch(), d.out_plane());
    let (img_in, img_out) = (d.c * d.h * d.w, d.o * plane);
    let tangent = dx.is_some() || dw.is_some();
    // With few output channels the GEMM's m is too small for its kernels (16×1024×144
    // runs at ~25 GFLOP/s here, 32×1024×144 at ~33): compute `[W; Ẇ]·cols(x)` as one
    // product into a scratch block and copy the two halves out.
    let stacked: Option<Vec<T>> = dw
        .filter(|_| d.o < STACK_BELOW_CHANNELS)
        .map(|dw| w.data().iter().chain(dw.data()).copied().collect());
    // Every output element is written by a copy or a first (overwriting)
    // product, so the outputs start uninitialised.
    let len = b * img_out;
    let (mut y, mut dy) = (
        Vec::with_capacity(len),
        Vec::with_capacity(if tangent { len } else { 0 }),
    );
    let (y_slots, dy_slots) = (
        image_slots(&mut y, b, img_out, true, true),
        image_slots(&mut dy, b, img_out, tangent, true),
    );
    y_slots.into_par_iter().zip(dy_slots).enumerate().for_each_init(
        || {
            (
                vec![T::ZERO; patch * plane],
                vec![T::ZERO; if dx.is_some() { patch * plane } else { 0 }],
                vec![T::ZERO; if stacked.is_some() { 2 * img_out } else { 0 }],
            )
        },
        |(cols, dcols, both), (k, (y_slot, dy_slot))| {
            im2col(&x.data()[k * img_in..(k + 1) * img_in], &d, g, cols);
            let (wd, o) = (w.data(), d.o);
            // `conv(x, ẇ)` when it was computed (the tangent's first term).
            let mut dy_started = None;
            if let Some(wstack) = &stacked {
                gemm_into(
                    both,
                    wstack,
                    false,
                    cols,
                    false,
                    2 * o,
                    plane,
                    patch,
                    false,
                    Par::Serial,
                );
                copy_uninit(y_slot, &both[..img_out]);
                copy_uninit(dy_slot, &both[img_out..]);
                // SAFETY: every element of `dy_slot` was just written.
                dy_started = Some(unsafe { assume_init_mut(dy_slot) });
            } else {
                gemm_overwrite(y_slot, wd, cols, o, plane, patch);
                if let Some(dw) = dw {
                    dy_started = Some(gemm_overwrite(dy_slot, dw.data(), cols, o, plane, patch));
                }
            }
            if let Some(dx) = dx {
                im2col(&dx.data()[k * img_in..(k + 1) * img_in], &d, g, dcols);
                match dy_started {
                    Some(dyb) => gemm_into(dyb, wd, false, dcols, false, o, plane, patch, true, Par::Serial),
                    None => {
                        gemm_overwrite(dy_slot, wd, dcols, o, plane, patch);
                    }
                }
            }
        },
    );
    // SAFETY: every image's slot of `y` was filled by a copy or a first
    // product above, and of `dy` (when there is a tangent: `dx` or `dw`) too.
    unsafe {
        y.set_len(len);
        dy.set_len(if tangent { len } else { 0 });
    }
    let shape = vec![b, d.o, d.ho, d.wo];
    let dy = tangent.then(|| Tensor::new(shape.clone(), dy).expect("b·o·ho·wo elements"));
    (Tensor::new(shape, y).expect("b·o·ho·wo elements"), dy)
}

/// One output slot per image in `v`: its first `images·per_image` elements, in
/// its spare capacity when `uninit` (then filled by the caller before `set_len`),
/// or empty slots when the output is not `wanted`.
fn image_slots<T: Float>(
    v: &mut Vec<T>,
    images: usize,
    per_image: usize,
    wanted: bool,
    uninit: bool,
) -> Vec<&mut [MaybeUninit<T>]> {
    if !wanted || per_image == 0 {
        (0..images).map(|_| &mut [][..]).collect()
    } else if uninit {
        v.spare_capacity_mut()[..images * per_image]
            .chunks_mut(per_image)
            .collect()
    } else {
        as_uninit(&mut v[..]).chunks_mut(per_image).collect()
    }
}

/// Gradient with respect to the input: `gy [B, O, Ho, Wo]`, w `[O, C, kh, kw]` →
/// `[B, C, H, W]` for an input of spatial size `h × w`.
pub fn backward_input<T: Float>(gy: &Tensor<T>, w: &Tensor<T>, input_hw: (usize, usize), g: ConvGeometry) -> Tensor<T> {
    backward_input_dual(gy, None, w, None, input_hw, g).0
}

/// The input gradient and its tangent, `(Wᵀ⋆gy, Wᵀ⋆ġy + Ẇᵀ⋆gy)`.
pub fn backward_input_dual<T: Float>(
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    w: &Tensor<T>,
    dw: Option<&Tensor<T>>,
    input_hw: (usize, usize),
    g: ConvGeometry,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let b = gy.shape()[0];
    let ws = w.shape();
    let d = Dims::new(&[b, ws[1], input_hw.0, input_hw.1], ws, g);
    assert_eq!(gy.shape(), [b, d.o, d.ho, d.wo], "conv backward_input: gradient shape");
    if rows::applies(&d, g) {
        return rows::backward_input_dual(gy, dgy, w, dw, &d);
    }
    let (patch, plane) = (d.patch(), d.out_plane());
    let (img_in, img_out) = (d.c * d.h * d.w, d.o * plane);
    let tangent = dgy.is_some() || dw.is_some();
    // Each image is written whole by `col2im_into`: no zero-fill first.
    let len = b * img_in;
    let mut gx: Vec<T> = Vec::with_capacity(len);
    let mut dgx: Vec<T> = Vec::with_capacity(if tangent { len } else { 0 });
    let gx_slots = image_slots(&mut gx, b, img_in, true, true);
    let dgx_slots = image_slots(&mut dgx, b, img_in, tangent, true);
    // Both tangent terms as one product with a doubled inner dimension,
    // `[W; Ẇ]ᵀ·[ġy; gy]`: one pass over the patch block instead of a product and
    // an accumulating one (and k = 2·O runs faster than k = O for small O).
    let stacked: Option<Vec<T>> = dgy
        .and(dw)
        .map(|dw| w.data().iter().chain(dw.data()).copied().collect());
    gx_slots.into_par_iter().zip(dgx_slots).enumerate().for_each_init(
        || {
            (
                vec![T::ZERO; patch * plane],
                vec![T::ZERO; if stacked.is_some() { 2 * img_out } else { 0 }],
            )
        },
        |(cols, both), (k, (gxb, dgxb))| {
            let image = k * img_out..(k + 1) * img_out;
            let gyb = &gy.data()[image.clone()];
            gemm_into(cols, w.data(), true, gyb, false, patch, plane, d.o, false, Par::Serial);
            col2im_into(cols, &d, g, gxb);
            if !tangent {
                return;
            }
            match (&stacked, dgy, dw) {
                (Some(wstack), Some(dgy), _) => {
                    both[..img_out].copy_from_slice(&dgy.data()[image]);
                    both[img_out..].copy_from_slice(gyb);
                    gemm_into(
                        cols,
                        wstack,
                        true,
                        both,
                        false,
                        patch,
                        plane,
                        2 * d.o,
                        false,
                        Par::Serial,
                    );
                }
                (_, Some(dgy), _) => {
                    let dgyb = &dgy.data()[image];
                    gemm_into(cols, w.data(), true, dgyb, false, patch, plane, d.o, false, Par::Serial);
                }
                (_, None, Some(dw)) => {
                    gemm_into(cols, dw.data(), true, gyb, false, patch, plane, d.o, false, Par::Serial);
                }
                (_, None, None) => unreachable!("a tangent is present"),
            }
            col2im_into(cols, &d, g, dgxb);
        },
    );
    // SAFETY: col2im_into wrote every image's slot whole (the tangent's when present).
    unsafe {
        gx.set_len(len);
        if tangent {
            dgx.set_len(len);
        }
    }
    let shape = vec![b, d.c, d.h, d.w];
    let dgx = tangent.then(|| Tensor::new(shape.clone(), dgx).expect("b·c·h·w elements"));
    let gx = Tensor::new(shape, gx).expect("b·c·h·w elements");
    (gx, dgx)
}

/// Gradient with respect to the weights: `Σ_b gy_b · im2col(x_b)ᵀ`, shape of `w_shape`.
/// A convolution's input and weight gradients with their tangents (see [`backward_dual`]).
pub struct Gradients<T> {
    /// `W'⋆gy`.
    pub gx: Tensor<T>,
    /// `W'⋆ġy + Ẇ'⋆gy`, when `ġy` or `Ẇ` is present.
    pub dgx: Option<Tensor<T>>,
    /// `Σ gy·colsᵀ(x)`, when wanted.
    pub gw: Option<Tensor<T>>,
    /// `Σ ġy·colsᵀ(x) + gy·colsᵀ(ẋ)`, when `ẋ` or `ġy` is present.
    pub dgw: Option<Tensor<T>>,
}

/// [`backward_input_dual`] and [`backward_weight_dual`] (its value only when
/// `want_weight_value`) in one pass over the images: the same-size stride-1
/// convolutions build each image's rows of the output gradient once for both
/// (the weight gradient then needs no rows of the input), the others run the
/// two kernels one after the other.
#[allow(clippy::type_complexity)]
pub fn backward_dual<T: Float>(
    (x, dx): (&Tensor<T>, Option<&Tensor<T>>),
    (gy, dgy): (&Tensor<T>, Option<&Tensor<T>>),
    (w, dw): (&Tensor<T>, Option<&Tensor<T>>),
    g: ConvGeometry,
    want_weight_value: bool,
) -> Gradients<T> {
    let d = Dims::new(x.shape(), w.shape(), g);
    let b = x.shape()[0];
    assert_eq!(gy.shape(), [b, d.o, d.ho, d.wo], "conv backward: gradient shape");
    if rows::applies(&d, g) {
        return rows::backward_dual((x, dx), (gy, dgy), (w, dw), &d, want_weight_value);
    }
    let (gx, dgx) = backward_input_dual(gy, dgy, w, dw, (d.h, d.w), g);
    let (gw, dgw) = weight_gradient_parts(x, dx, gy, dgy, w.shape(), g, want_weight_value);
    Gradients { gx, dgx, gw, dgw }
}

pub fn backward_weight<T: Float>(x: &Tensor<T>, gy: &Tensor<T>, w_shape: &[usize], g: ConvGeometry) -> Tensor<T> {
    backward_weight_dual(x, None, gy, None, w_shape, g).0
}

/// The weight gradient and its tangent, `(Σ gy·colsᵀ(x), Σ ġy·colsᵀ(x) + gy·colsᵀ(ẋ))`,
/// computing each image's patches once. Partial sums over fixed groups of images
/// are added in order, so the result does not depend on the thread count.
pub fn backward_weight_dual<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    w_shape: &[usize],
    g: ConvGeometry,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let (gw, dgw) = weight_gradient_parts(x, dx, gy, dgy, w_shape, g, true);
    (gw.expect("value requested"), dgw)
}

/// Buffers of [`image_weight_gradient_into`], reused across the images of one
/// layer (its patches' zero padding is written once, where the layer's
/// geometry puts it, and never again).
pub struct ImageGradientScratch<T> {
    patches: Vec<T>,
    acc: Vec<T>,
}

impl<T: Float> ImageGradientScratch<T> {
    /// Empty buffers, grown on first use.
    pub fn new() -> Self {
        ImageGradientScratch {
            patches: Vec::new(),
            acc: Vec::new(),
        }
    }

    fn sized(&mut self, patches: usize, acc: usize) -> (&mut [T], &mut [T]) {
        for (buf, len) in [(&mut self.patches, patches), (&mut self.acc, acc)] {
            if buf.len() < len {
                buf.resize(len, T::ZERO);
            }
        }
        (&mut self.patches[..patches], &mut self.acc[..acc])
    }
}

impl<T: Float> Default for ImageGradientScratch<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// One image's weight gradient, the per-example form of [`backward_weight`]
/// (the same products): `x` `[C, H, W]` and `gy` `[O, Ho, Wo]` give row `o`
/// of `out`, `[C, kh, kw]` flattened, at `out[o·ld ..]` (`ld ≥ C·kh·kw`; the
/// entries between rows are left as they are). No allocation once `scratch`
/// has grown to the layer's sizes.
#[allow(clippy::too_many_arguments)]
pub fn image_weight_gradient_into<T: Float>(
    x: &[T],
    image_shape: [usize; 3],
    gy: &[T],
    w_shape: &[usize],
    g: ConvGeometry,
    scratch: &mut ImageGradientScratch<T>,
    out: &mut [T],
    ld: usize,
) {
    let [c, h, w] = image_shape;
    let d = Dims::new(&[1, c, h, w], w_shape, g);
    let (patch, plane) = (d.patch(), d.out_plane());
    assert!(
        ld >= patch && out.len() >= (d.o - 1) * ld + patch,
        "image_weight_gradient_into: output rows"
    );
    assert_eq!(
        (x.len(), gy.len()),
        (c * h * w, d.o * plane),
        "image_weight_gradient_into: image sizes"
    );
    if rows::applies(&d, g) {
        return rows::image_weight_gradient_into(x, gy, &d, scratch, out, ld);
    }
    let (cols, acc) = scratch.sized(patch * plane, patch * d.o);
    im2col(x, &d, g, cols);
    // gWᵀ [patch, O] = cols [patch, HW] · gyᵀ, as the batched kernel computes it.
    gemm_into(acc, cols, false, gy, true, patch, d.o, plane, false, Par::Serial);
    for (r, row) in acc.chunks_exact(d.o).enumerate() {
        for (o, &v) in row.iter().enumerate() {
            out[o * ld + r] = v;
        }
    }
}

/// Only the tangent of the weight gradient, `Σ ġy·colsᵀ(x) + gy·colsᵀ(ẋ)`
/// (`None` when both tangents are absent): forward-over-reverse wants `H v`, not
/// the gradient, so the value's product is skipped.
pub fn backward_weight_tangent<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    w_shape: &[usize],
    g: ConvGeometry,
) -> Option<Tensor<T>> {
    weight_gradient_parts(x, dx, gy, dgy, w_shape, g, false).1
}

fn weight_gradient_parts<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    w_shape: &[usize],
    g: ConvGeometry,
    want_value: bool,
) -> (Option<Tensor<T>>, Option<Tensor<T>>) {
    let d = Dims::new(x.shape(), w_shape, g);
    let b = x.shape()[0];
    assert_eq!(gy.shape(), [b, d.o, d.ho, d.wo], "conv backward_weight: gradient shape");
    let (patch, plane) = (d.patch(), d.out_plane());
    let tangent = dx.is_some() || dgy.is_some();
    if !want_value && !tangent {
        return (None, None);
    }
    if rows::applies(&d, g) {
        return rows::weight_gradient_parts(x, dx, gy, dgy, &d, want_value);
    }
    // Accumulated transposed, gWᵀ [patch, O] += cols [patch, HW] · gyᵀ: with the long
    // HW dimension as k and patch as m this runs ~2× faster than gy · colsᵀ.
    let (gwt, dgwt) = weight_gradient_sums(
        (x, dx),
        (gy, dgy),
        want_value,
        d.o * patch,
        patch * plane,
        |image, cols| im2col(image, &d, g, cols),
        |acc, cols, g| gemm_into(acc, cols, false, g, true, patch, d.o, plane, true, Par::Serial),
    );
    let transpose = |t: &[T]| -> Tensor<T> {
        let mut out = Tensor::zeros(w_shape);
        for (r, row) in t.chunks(d.o).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                out.data_mut()[o * patch + r] = v;
            }
        }
        out
    };
    (want_value.then(|| transpose(&gwt)), tangent.then(|| transpose(&dgwt)))
}

/// The weight-gradient sums shared by both convolution lowerings: over the
/// images, `product(patches(x_b), gy_b)` (the value, when `want_value`) and
/// `product(patches(x_b), ġy_b) + product(patches(ẋ_b), gy_b)` (the tangent,
/// when a tangent is present), with `gy_b` as stored, `[O × H·W]` (the product
/// is NT: no transposed copy per image, see `docs/performance.md`). `patches`
/// fills an image's patch buffer of `patch_len`; `product` adds one product
/// into an accumulator of `len`. Partial sums over fixed groups of images are
/// added in order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn weight_gradient_sums<T: Float>(
    (x, dx): (&Tensor<T>, Option<&Tensor<T>>),
    (gy, dgy): (&Tensor<T>, Option<&Tensor<T>>),
    want_value: bool,
    len: usize,
    patch_len: usize,
    patches: impl Fn(&[T], &mut [T]) + Sync,
    product: impl Fn(&mut [T], &[T], &[T]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let b = x.shape()[0];
    let (img_in, img_out) = (x.numel() / b.max(1), gy.numel() / b.max(1));
    let tangent = dx.is_some() || dgy.is_some();
    let groups: Vec<usize> = (0..b).step_by(WEIGHT_GRAD_GROUP).collect();
    let partials: Vec<(Vec<T>, Vec<T>)> = groups
        .par_iter()
        .map(|&start| {
            let mut acc = vec![T::ZERO; if want_value { len } else { 0 }];
            let mut dacc = vec![T::ZERO; if tangent { len } else { 0 }];
            let mut cols = vec![T::ZERO; patch_len];
            for k in start..(start + WEIGHT_GRAD_GROUP).min(b) {
                patches(&x.data()[k * img_in..(k + 1) * img_in], &mut cols);
                let image = k * img_out..(k + 1) * img_out;
                let g = &gy.data()[image.clone()];
                if want_value {
                    product(&mut acc, &cols, g);
                }
                if let Some(dgy) = dgy {
                    product(&mut dacc, &cols, &dgy.data()[image]);
                }
                if let Some(dx) = dx {
                    patches(&dx.data()[k * img_in..(k + 1) * img_in], &mut cols);
                    product(&mut dacc, &cols, g);
                }
            }
            (acc, dacc)
        })
        .collect();
    let mut gwt = vec![T::ZERO; if want_value { len } else { 0 }];
    let mut dgwt = vec![T::ZERO; if tangent { len } else { 0 }];
    for (p, dp) in partials {
        gwt.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        dgwt.iter_mut().zip(dp).for_each(|(a, v)| *a += v);
    }
    (gwt, dgwt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elementwise::dot_f64;

    fn pseudo(shape: &[usize], seed: f64) -> Tensor<f64> {
        let n = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|i| ((i as f64 + seed) * 0.7131).sin()).collect(),
        )
        .unwrap()
    }

    /// Direct definition of the convolution, for comparison.
    fn naive(x: &Tensor<f64>, w: &Tensor<f64>, g: ConvGeometry) -> Tensor<f64> {
        let (b, c, h, wd) = x.dims4();
        let (o, _, kh, kw) = w.dims4();
        let (ho, wo) = (
            out_size(h, kh, g.stride, g.padding),
            out_size(wd, kw, g.stride, g.padding),
        );
        let mut y = Tensor::zeros(&[b, o, ho, wo]);
        for bi in 0..b {
            for oi in 0..o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = 0.0;
                        for ci in 0..c {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (oy * g.stride + i) as isize - g.padding as isize;
                                    let ix = (ox * g.stride + j) as isize - g.padding as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                        acc += x.data()[((bi * c + ci) * h + iy as usize) * wd + ix as usize]
                                            * w.data()[((oi * c + ci) * kh + i) * kw + j];
                                    }
                                }
                            }
                        }
                        y.data_mut()[((bi * o + oi) * ho + oy) * wo + ox] = acc;
                    }
                }
            }
        }
        y
    }

    /// Kernel size, stride, padding: the row-patch path (stride 1, same size: 3×3,
    /// 5×5, 1×1) and the im2col one (stride 2, or a shrinking output).
    const GEOMETRIES: [(usize, usize, usize); 7] = [
        (3, 1, 1),
        (5, 1, 2),
        (1, 1, 0),
        (3, 2, 1),
        (3, 2, 0),
        (3, 1, 0),
        (1, 2, 0),
    ];

    #[test]
    fn forward_matches_definition_and_backwards_are_adjoint() {
        // Odd and even widths (the stride-2 column phases differ).
        for (h, wd) in [(7, 6), (6, 7)] {
            for (k, stride, padding) in GEOMETRIES {
                let g = ConvGeometry { stride, padding };
                let x = pseudo(&[11, 3, h, wd], 0.3);
                let w = pseudo(&[4, 3, k, k], 1.7);
                let y = forward(&x, &w, g);
                let want = naive(&x, &w, g);
                for (a, b) in y.data().iter().zip(want.data()) {
                    assert!((a - b).abs() < 1e-12, "{g:?} k={k}: {a} vs {b}");
                }
                let gy = pseudo(y.shape(), 5.0);
                // ⟨conv(x, w), gy⟩ = ⟨x, backward_input(gy)⟩ = ⟨w, backward_weight(x, gy)⟩
                let base = dot_f64(&y, &gy);
                let via_x = dot_f64(&x, &backward_input(&gy, &w, (h, wd), g));
                let via_w = dot_f64(&w, &backward_weight(&x, &gy, w.shape(), g));
                assert!((base - via_x).abs() < 1e-10 * base.abs().max(1.0), "{g:?} k={k}");
                assert!((base - via_w).abs() < 1e-10 * base.abs().max(1.0), "{g:?} k={k}");
            }
        }
    }

    #[test]
    fn one_image_gradients_with_reused_scratch_equal_the_batched_kernel() {
        for (h, wd) in [(7, 6), (6, 7)] {
            for (k, stride, padding) in GEOMETRIES {
                let g = ConvGeometry { stride, padding };
                let x = pseudo(&[2, 3, h, wd], 0.9);
                let w_shape = [4, 3, k, k];
                let gy = pseudo(forward(&x, &pseudo(&w_shape, 0.1), g).shape(), 2.3);
                let (img_in, img_out) = (x.numel() / 2, gy.numel() / 2);
                let patch = 3 * k * k;
                // Rows of `patch + 2` with sentinels between them, which must survive.
                let ld = patch + 2;
                let mut scratch = ImageGradientScratch::new();
                for i in 0..2 {
                    let one = |t: &Tensor<f64>, n: usize| {
                        let mut shape = t.shape().to_vec();
                        shape[0] = 1;
                        Tensor::new(shape, t.data()[i * n..(i + 1) * n].to_vec()).unwrap()
                    };
                    let want = backward_weight(&one(&x, img_in), &one(&gy, img_out), &w_shape, g);
                    let mut out = vec![-7.0; 4 * ld];
                    let (xi, gi) = (&x.data()[i * img_in..][..img_in], &gy.data()[i * img_out..][..img_out]);
                    image_weight_gradient_into(xi, [3, h, wd], gi, &w_shape, g, &mut scratch, &mut out, ld);
                    for o in 0..4 {
                        assert_eq!(
                            &out[o * ld..o * ld + patch],
                            &want.data()[o * patch..(o + 1) * patch],
                            "{g:?} k={k}"
                        );
                        assert_eq!(&out[o * ld + patch..(o + 1) * ld], &[-7.0, -7.0]);
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_into_transposes_every_shape() {
        fn check<T: Float>() {
            for (rows, cols) in [(16, 1024), (3, 5), (8, 8), (9, 17), (1, 7), (7, 1), (24, 40), (17, 23)] {
                let src: Vec<T> = (0..rows * cols).map(|i| T::from_f64(i as f64)).collect();
                let mut dst = vec![T::from_f64(f64::NAN); rows * cols];
                transpose_into(&src, rows, cols, &mut dst);
                for r in 0..rows {
                    for c in 0..cols {
                        assert_eq!(
                            dst[c * rows + r].to_f64(),
                            (r * cols + c) as f64,
                            "{:?} {rows}×{cols} at ({r}, {c})",
                            T::DTYPE
                        );
                    }
                }
            }
        }
        // f32 runs the AVX blocks where the CPU has AVX, f64 the scalar ones.
        check::<f32>();
        check::<f64>();
    }

    #[test]
    fn contiguous_im2col_equals_the_row_by_row_one() {
        for (h, w, k, p) in [
            (7, 6, 3, 1),
            (1, 1, 3, 1),
            (2, 5, 3, 1),
            (6, 4, 5, 2),
            (4, 3, 1, 0),
            (3, 8, 5, 2),
        ] {
            let g = ConvGeometry { stride: 1, padding: p };
            let x = pseudo(&[1, 2, h, w], 0.9);
            let d = Dims::new(x.shape(), &[1, 2, k, k], g);
            assert_eq!((d.ho, d.wo), (h, w));
            let mut want = vec![f64::NAN; d.patch() * d.out_plane()];
            let mut got = vec![f64::NAN; d.patch() * d.out_plane()];
            im2col_rows(x.data(), &d, g, &mut want);
            im2col_same(x.data(), &d, p, &mut got);
            assert_eq!(got, want, "{h}x{w}, kernel {k}, padding {p}");
            let mut rows = pseudo(&[1, d.patch() * d.out_plane()], 0.4).data().to_vec();
            // Into a fresh image (centre row written first): the same sums, reordered.
            let gap = col2im_paths_differ_by(&mut rows, &d, g);
            assert!(gap < 1e-12, "col2im_into {h}x{w}, kernel {k}, padding {p}");
        }
    }

    #[test]
    fn dual_kernels_equal_the_product_rule() {
        // 3 output channels: the forward stacks [W; Ẇ]; 33: separate products.
        // Stride 1: row patches; stride 2: im2col.
        for o in [3, STACK_BELOW_CHANNELS + 1] {
            for stride in [1, 2] {
                dual_kernels_at(o, ConvGeometry { stride, padding: 1 });
            }
        }
    }

    fn dual_kernels_at(o: usize, g: ConvGeometry) {
        let (x, dx) = (pseudo(&[9, 2, 6, 6], 0.1), pseudo(&[9, 2, 6, 6], 0.2));
        let (w, dw) = (pseudo(&[o, 2, 3, 3], 0.3), pseudo(&[o, 2, 3, 3], 0.4));
        let close =
            |a: &Tensor<f64>, b: &Tensor<f64>| a.data().iter().zip(b.data()).all(|(p, q)| (p - q).abs() < 1e-12);
        let add = crate::elementwise::add;
        let (y, dy) = forward_dual(&x, Some(&dx), &w, Some(&dw), g);
        assert!(close(&y, &forward(&x, &w, g)));
        assert!(close(&dy.unwrap(), &add(&forward(&dx, &w, g), &forward(&x, &dw, g))));
        let (gy, dgy) = (pseudo(y.shape(), 0.5), pseudo(y.shape(), 0.6));
        let (gx, dgx) = backward_input_dual(&gy, Some(&dgy), &w, Some(&dw), (6, 6), g);
        assert!(close(&gx, &backward_input(&gy, &w, (6, 6), g)));
        let want = add(
            &backward_input(&dgy, &w, (6, 6), g),
            &backward_input(&gy, &dw, (6, 6), g),
        );
        assert!(close(&dgx.unwrap(), &want));
        let (gw, dgw) = backward_weight_dual(&x, Some(&dx), &gy, Some(&dgy), w.shape(), g);
        assert!(close(&gw, &backward_weight(&x, &gy, w.shape(), g)));
        let want = add(
            &backward_weight(&dx, &gy, w.shape(), g),
            &backward_weight(&x, &dgy, w.shape(), g),
        );
        let dgw = dgw.unwrap();
        assert!(close(&dgw, &want));
        let alone = backward_weight_tangent(&x, Some(&dx), &gy, Some(&dgy), w.shape(), g).unwrap();
        assert_eq!(alone.data(), dgw.data(), "tangent without the value: bitwise the same");
        assert!(backward_weight_tangent(&x, None, &gy, None, w.shape(), g).is_none());
        // Only one tangent present.
        let (_, dy) = forward_dual(&x, None, &w, Some(&dw), g);
        assert!(close(&dy.unwrap(), &forward(&x, &dw, g)));
        let (_, dgx) = backward_input_dual(&gy, Some(&dgy), &w, None, (6, 6), g);
        assert!(close(&dgx.unwrap(), &backward_input(&dgy, &w, (6, 6), g)));
        let (_, dgx) = backward_input_dual(&gy, None, &w, Some(&dw), (6, 6), g);
        assert!(close(&dgx.unwrap(), &backward_input(&gy, &dw, (6, 6), g)));
        // Both gradients in one pass: what the two kernels give, for every
        // subset of tangents, with and without the weight gradient's value.
        let mut seen = 0;
        for dx in [None, Some(&dx)] {
            for dgy in [None, Some(&dgy)] {
                for dw in [None, Some(&dw)] {
                    for want_value in [false, true] {
                        let both = backward_dual((&x, dx), (&gy, dgy), (&w, dw), g, want_value);
                        let (gx, dgx) = backward_input_dual(&gy, dgy, &w, dw, (6, 6), g);
                        let (gw, dgw) = weight_gradient_parts(&x, dx, &gy, dgy, w.shape(), g, want_value);
                        assert!(close(&both.gx, &gx));
                        assert_eq!(both.dgx.is_some(), dgx.is_some());
                        assert!(both.dgx.iter().zip(&dgx).all(|(a, b)| close(a, b)));
                        assert_eq!((both.gw.is_some(), both.dgw.is_some()), (gw.is_some(), dgw.is_some()));
                        assert!(both.gw.iter().zip(&gw).all(|(a, b)| close(a, b)));
                        assert!(both.dgw.iter().zip(&dgw).all(|(a, b)| close(a, b)));
                        seen += usize::from(both.dgw.is_some());
                    }
                }
            }
        }
        assert_eq!(seen, 12, "the weight gradient's tangent wherever ẋ or ġy is present");
    }
}
