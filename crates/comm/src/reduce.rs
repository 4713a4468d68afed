//! The reduction arithmetic every backend shares, so that a collective gives bit-identical results
//! on threads and on processes.
//!
//! A ring all-reduce adds each segment in ring order, rounding to the element type after every
//! step (as NCCL does); the in-process backend reproduces exactly that order with
//! [`ring_reduce_segment`], so `tessera score` prints the same bits under `tessera launch` as in
//! one process, whatever the number of ranks.
//!
//! Order: segment `k` of `n` starts at rank `k + 1` and is combined with ranks `k + 2, ..., k + n`
//! (mod `n`); rank `k` ends up holding it. Sums and maxima saturate for integers; `Avg` divides the
//! finished sum by `n` (truncating for integers).

use std::ops::Range;

use half::{bf16, f16};

use crate::{ElemKind, ReduceOp};

/// Element range of segment `k` when `elems` elements are split over `n` ranks (sizes differ by at
/// most one element).
pub(crate) fn segment(elems: usize, n: usize, k: usize) -> Range<usize> {
    (k * elems / n)..((k + 1) * elems / n)
}

fn zip_apply<const S: usize>(acc: &mut [u8], x: &[u8], f: impl Fn([u8; S], [u8; S]) -> [u8; S]) {
    for (a, b) in acc.chunks_exact_mut(S).zip(x.chunks_exact(S)) {
        let (Ok(aa), Ok(bb)) = (<[u8; S]>::try_from(&*a), <[u8; S]>::try_from(b)) else {
            continue; // unreachable: chunks_exact yields S bytes
        };
        a.copy_from_slice(&f(aa, bb));
    }
}

fn map_apply<const S: usize>(acc: &mut [u8], f: impl Fn([u8; S]) -> [u8; S]) {
    for a in acc.chunks_exact_mut(S) {
        let Ok(aa) = <[u8; S]>::try_from(&*a) else {
            continue;
        };
        a.copy_from_slice(&f(aa));
    }
}

/// `acc[i] = acc[i] op x[i]` elementwise (for `Avg`, the sum), rounded to the element type.
pub(crate) fn combine(kind: ElemKind, op: ReduceOp, acc: &mut [u8], x: &[u8]) {
    let max = op == ReduceOp::Max;
    if kind == ElemKind::F32 && combine_f32_aligned(max, acc, x) {
        return;
    }
    match kind {
        ElemKind::F32 => zip_apply::<4>(acc, x, |a, b| {
            let (a, b) = (f32::from_le_bytes(a), f32::from_le_bytes(b));
            (if max { a.max(b) } else { a + b }).to_le_bytes()
        }),
        ElemKind::BF16 => zip_apply::<2>(acc, x, |a, b| {
            let (a, b) = (bf16::from_le_bytes(a), bf16::from_le_bytes(b));
            let r = if max {
                a.max(b)
            } else {
                bf16::from_f32(a.to_f32() + b.to_f32())
            };
            r.to_le_bytes()
        }),
        ElemKind::F16 => zip_apply::<2>(acc, x, |a, b| {
            let (a, b) = (f16::from_le_bytes(a), f16::from_le_bytes(b));
            let r = if max {
                a.max(b)
            } else {
                f16::from_f32(a.to_f32() + b.to_f32())
            };
            r.to_le_bytes()
        }),
        ElemKind::I32 => zip_apply::<4>(acc, x, |a, b| {
            let (a, b) = (i32::from_le_bytes(a), i32::from_le_bytes(b));
            (if max { a.max(b) } else { a.saturating_add(b) }).to_le_bytes()
        }),
        ElemKind::U8 => {
            for (a, b) in acc.iter_mut().zip(x) {
                *a = if max {
                    (*a).max(*b)
                } else {
                    a.saturating_add(*b)
                };
            }
        }
    }
}

/// The common case at memory speed: both buffers 4-byte aligned (they come from `f32` vectors),
/// on a little-endian host where the bytes are the native `f32`s. Same arithmetic as the general
/// path. Returns false (doing nothing) when it does not apply.
fn combine_f32_aligned(max: bool, acc: &mut [u8], x: &[u8]) -> bool {
    if cfg!(target_endian = "big") {
        return false;
    }
    // SAFETY: every bit pattern is a valid f32; align_to only reinterprets the aligned middle.
    let (pa, a, sa) = unsafe { acc.align_to_mut::<f32>() };
    let (pb, b, sb) = unsafe { x.align_to::<f32>() };
    if !(pa.is_empty() && sa.is_empty() && pb.is_empty() && sb.is_empty()) {
        return false;
    }
    if max {
        a.iter_mut().zip(b).for_each(|(a, b)| *a = a.max(*b));
    } else {
        a.iter_mut().zip(b).for_each(|(a, b)| *a += *b);
    }
    true
}

/// Turns a finished sum into the mean over `n` ranks (only for `Avg`).
pub(crate) fn finish(kind: ElemKind, op: ReduceOp, acc: &mut [u8], n: usize) {
    if op != ReduceOp::Avg || n == 1 {
        return;
    }
    match kind {
        ElemKind::F32 => map_apply::<4>(acc, |a| (f32::from_le_bytes(a) / n as f32).to_le_bytes()),
        ElemKind::BF16 => map_apply::<2>(acc, |a| {
            bf16::from_f32(bf16::from_le_bytes(a).to_f32() / n as f32).to_le_bytes()
        }),
        ElemKind::F16 => map_apply::<2>(acc, |a| {
            f16::from_f32(f16::from_le_bytes(a).to_f32() / n as f32).to_le_bytes()
        }),
        ElemKind::I32 => map_apply::<4>(acc, |a| (i32::from_le_bytes(a) / n as i32).to_le_bytes()),
        ElemKind::U8 => acc.iter_mut().for_each(|a| *a /= n.min(255) as u8),
    }
}

/// Reduces bytes `range` of every rank's deposit into `out` in the ring order of segment `k`,
/// exactly as the TCP ring computes it.
pub(crate) fn ring_reduce_segment(
    slots: &[Vec<u8>],
    kind: ElemKind,
    op: ReduceOp,
    k: usize,
    range: Range<usize>,
    out: &mut [u8],
) {
    let n = slots.len();
    out.copy_from_slice(&slots[(k + 1) % n][range.clone()]);
    for j in 2..=n {
        combine(kind, op, out, &slots[(k + j) % n][range.clone()]);
    }
    finish(kind, op, out, n);
}
