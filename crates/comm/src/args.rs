//! The argument checks every backend makes before a collective: the same mistake gets the same
//! message from the in-process, TCP and NCCL backends. Each returns the message; the backend
//! wraps it in its `CommError::Invalid` (naming its rank).

use crate::ElemKind;

/// A buffer of whole elements of `kind`.
pub(crate) fn all_reduce(len: usize, kind: ElemKind) -> Result<(), String> {
    if len.is_multiple_of(kind.size()) {
        Ok(())
    } else {
        Err(format!("all_reduce of {len} bytes of {kind:?}"))
    }
}

/// A receive buffer `n` times the send buffer.
pub(crate) fn all_gather(send: usize, recv: usize, n: usize) -> Result<(), String> {
    if recv == send * n {
        Ok(())
    } else {
        Err(format!(
            "all_gather of {send} bytes needs a receive buffer of {}, got {recv}",
            send * n
        ))
    }
}

/// A send buffer `n` times the receive buffer, which holds whole elements of `kind`.
pub(crate) fn reduce_scatter(
    send: usize,
    recv: usize,
    kind: ElemKind,
    n: usize,
) -> Result<(), String> {
    if send == recv * n && recv.is_multiple_of(kind.size()) {
        Ok(())
    } else {
        Err(format!(
            "reduce_scatter of {send} bytes into {recv} bytes on {n} ranks"
        ))
    }
}

/// `r` (a root, destination or source: `what`) is a rank of a group of `n`.
pub(crate) fn rank(what: &str, r: usize, n: usize) -> Result<(), String> {
    if r < n {
        Ok(())
    } else {
        Err(format!("{what} {r} is not a rank of a group of {n}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_accepts_the_right_sizes_and_names_the_wrong_ones() {
        assert!(all_reduce(12, ElemKind::F32).is_ok());
        assert_eq!(
            all_reduce(6, ElemKind::F32).unwrap_err(),
            "all_reduce of 6 bytes of F32"
        );
        assert!(all_gather(8, 24, 3).is_ok());
        assert_eq!(
            all_gather(8, 16, 3).unwrap_err(),
            "all_gather of 8 bytes needs a receive buffer of 24, got 16"
        );
        assert!(reduce_scatter(24, 8, ElemKind::F32, 3).is_ok());
        assert!(reduce_scatter(24, 6, ElemKind::F32, 3).is_err());
        assert!(reduce_scatter(12, 6, ElemKind::F32, 2).is_err()); // 6 bytes: not whole f32s
        assert!(reduce_scatter(12, 6, ElemKind::BF16, 2).is_ok());
        assert!(rank("root", 2, 3).is_ok());
        assert_eq!(
            rank("source", 3, 3).unwrap_err(),
            "source 3 is not a rank of a group of 3"
        );
    }
}
