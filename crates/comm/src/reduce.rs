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

/// `out[i] = f(a[i], x[i])` over `S`-byte elements, where `a` is `out` itself when `None`.
fn zip_apply<const S: usize>(
    out: &mut [u8],
    a: Option<&[u8]>,
    x: &[u8],
    f: impl Fn([u8; S], [u8; S]) -> [u8; S],
) {
    let elem = |c: &[u8]| <[u8; S]>::try_from(c).unwrap_or([0; S]); // chunks_exact yields S bytes
    match a {
        None => {
            for (o, b) in out.chunks_exact_mut(S).zip(x.chunks_exact(S)) {
                let r = f(elem(o), elem(b));
                o.copy_from_slice(&r);
            }
        }
        Some(a) => {
            for ((o, a), b) in out
                .chunks_exact_mut(S)
                .zip(a.chunks_exact(S))
                .zip(x.chunks_exact(S))
            {
                o.copy_from_slice(&f(elem(a), elem(b)));
            }
        }
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
    combine_to(kind, op, acc, None, x)
}

/// `out[i] = a[i] op x[i]`: [`combine`] with the result in a third buffer (same bits).
pub(crate) fn combine_into(kind: ElemKind, op: ReduceOp, out: &mut [u8], a: &[u8], x: &[u8]) {
    combine_to(kind, op, out, Some(a), x)
}

fn combine_to(kind: ElemKind, op: ReduceOp, acc: &mut [u8], a: Option<&[u8]>, x: &[u8]) {
    let max = op == ReduceOp::Max;
    if kind == ElemKind::F32 && combine_f32_aligned(max, acc, a, x) {
        return;
    }
    match kind {
        ElemKind::F32 => zip_apply::<4>(acc, a, x, |a, b| {
            let (a, b) = (f32::from_le_bytes(a), f32::from_le_bytes(b));
            (if max { a.max(b) } else { a + b }).to_le_bytes()
        }),
        ElemKind::BF16 => zip_apply::<2>(acc, a, x, |a, b| {
            let (a, b) = (bf16::from_le_bytes(a), bf16::from_le_bytes(b));
            let r = if max {
                a.max(b)
            } else {
                bf16::from_f32(a.to_f32() + b.to_f32())
            };
            r.to_le_bytes()
        }),
        ElemKind::F16 => zip_apply::<2>(acc, a, x, |a, b| {
            let (a, b) = (f16::from_le_bytes(a), f16::from_le_bytes(b));
            let r = if max {
                a.max(b)
            } else {
                f16::from_f32(a.to_f32() + b.to_f32())
            };
            r.to_le_bytes()
        }),
        ElemKind::I32 => zip_apply::<4>(acc, a, x, |a, b| {
            let (a, b) = (i32::from_le_bytes(a), i32::from_le_bytes(b));
            (if max { a.max(b) } else { a.saturating_add(b) }).to_le_bytes()
        }),
        ElemKind::U8 => zip_apply::<1>(acc, a, x, |[a], [b]| {
            [if max { a.max(b) } else { a.saturating_add(b) }]
        }),
    }
}

/// The common case at memory speed: all buffers 4-byte aligned (they come from `f32` vectors),
/// on a little-endian host where the bytes are the native `f32`s. Same arithmetic as the general
/// path. Returns false (doing nothing) when it does not apply.
fn combine_f32_aligned(max: bool, acc: &mut [u8], a: Option<&[u8]>, x: &[u8]) -> bool {
    fn whole<T>(p: &[T], s: &[T]) -> bool {
        p.is_empty() && s.is_empty()
    }
    if cfg!(target_endian = "big") {
        return false;
    }
    // SAFETY: every bit pattern is a valid f32; align_to only reinterprets the aligned middle.
    let (po, o, so) = unsafe { acc.align_to_mut::<f32>() };
    let (pb, b, sb) = unsafe { x.align_to::<f32>() };
    if !(whole(po, so) && whole(pb, sb)) {
        return false;
    }
    // One loop per case, each a straight vectorizable loop.
    match (a, max) {
        (None, true) => o.iter_mut().zip(b).for_each(|(o, b)| *o = o.max(*b)),
        (None, false) => o.iter_mut().zip(b).for_each(|(o, b)| *o += *b),
        (Some(a), max) => {
            // SAFETY: as above.
            let (pa, a, sa) = unsafe { a.align_to::<f32>() };
            if !whole(pa, sa) {
                return false;
            }
            let pairs = o.iter_mut().zip(a).zip(b);
            if max {
                pairs.for_each(|((o, a), b)| *o = a.max(*b));
            } else {
                pairs.for_each(|((o, a), b)| *o = *a + *b);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms of the combine give the arithmetic of each type, element by element.
    #[test]
    fn combine_and_combine_into_agree_with_plain_arithmetic() {
        let f: Vec<f32> = (0..67).map(|i| i as f32 * 0.37 - 11.0).collect();
        let g: Vec<f32> = (0..67)
            .map(|i| (i * 13 % 29) as f32 * -0.51 + 3.0)
            .collect();
        let le = |v: Vec<Vec<u8>>| v.concat();
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            ElemKind,
            Vec<u8>,
            Vec<u8>,
            Box<dyn Fn(bool, &[u8], &[u8]) -> Vec<u8>>,
        )> = vec![
            (
                ElemKind::F32,
                le(f.iter().map(|x| x.to_le_bytes().to_vec()).collect()),
                le(g.iter().map(|x| x.to_le_bytes().to_vec()).collect()),
                Box::new(|max, a, b| {
                    let (a, b) = (
                        f32::from_le_bytes(a.try_into().unwrap()),
                        f32::from_le_bytes(b.try_into().unwrap()),
                    );
                    (if max { a.max(b) } else { a + b }).to_le_bytes().to_vec()
                }),
            ),
            (
                ElemKind::BF16,
                le(f.iter()
                    .map(|x| bf16::from_f32(*x).to_le_bytes().to_vec())
                    .collect()),
                le(g.iter()
                    .map(|x| bf16::from_f32(*x).to_le_bytes().to_vec())
                    .collect()),
                Box::new(|max, a, b| {
                    let (a, b) = (
                        bf16::from_le_bytes(a.try_into().unwrap()),
                        bf16::from_le_bytes(b.try_into().unwrap()),
                    );
                    (if max {
                        a.max(b)
                    } else {
                        bf16::from_f32(a.to_f32() + b.to_f32())
                    })
                    .to_le_bytes()
                    .to_vec()
                }),
            ),
            (
                ElemKind::F16,
                le(f.iter()
                    .map(|x| f16::from_f32(*x).to_le_bytes().to_vec())
                    .collect()),
                le(g.iter()
                    .map(|x| f16::from_f32(*x).to_le_bytes().to_vec())
                    .collect()),
                Box::new(|max, a, b| {
                    let (a, b) = (
                        f16::from_le_bytes(a.try_into().unwrap()),
                        f16::from_le_bytes(b.try_into().unwrap()),
                    );
                    (if max {
                        a.max(b)
                    } else {
                        f16::from_f32(a.to_f32() + b.to_f32())
                    })
                    .to_le_bytes()
                    .to_vec()
                }),
            ),
            (
                ElemKind::I32,
                le(f.iter()
                    .map(|x| ((x * 3e8) as i32).to_le_bytes().to_vec())
                    .collect()),
                le(g.iter()
                    .map(|x| ((x * 3e8) as i32).to_le_bytes().to_vec())
                    .collect()),
                Box::new(|max, a, b| {
                    let (a, b) = (
                        i32::from_le_bytes(a.try_into().unwrap()),
                        i32::from_le_bytes(b.try_into().unwrap()),
                    );
                    (if max { a.max(b) } else { a.saturating_add(b) })
                        .to_le_bytes()
                        .to_vec()
                }),
            ),
            (
                ElemKind::U8,
                f.iter().map(|x| (x.abs() * 20.0) as u8).collect(),
                g.iter().map(|x| (x.abs() * 40.0) as u8).collect(),
                Box::new(|max, a, b| {
                    vec![if max {
                        a[0].max(b[0])
                    } else {
                        a[0].saturating_add(b[0])
                    }]
                }),
            ),
        ];
        for (kind, a, x, reference) in &cases {
            for op in [ReduceOp::Sum, ReduceOp::Max] {
                let max = op == ReduceOp::Max;
                let s = kind.size();
                let want: Vec<u8> = a
                    .chunks(s)
                    .zip(x.chunks(s))
                    .flat_map(|(a, b)| reference(max, a, b))
                    .collect();
                let mut acc = a.clone();
                combine(*kind, op, &mut acc, x);
                assert_eq!(acc, want, "{kind:?} {op:?} in place");
                let mut out = vec![0u8; a.len()];
                combine_into(*kind, op, &mut out, a, x);
                assert_eq!(out, want, "{kind:?} {op:?} into");
            }
        }
    }
}
